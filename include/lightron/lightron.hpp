// lightron/lightron.hpp — everything, one include. Each header below is one chapter; a
// prototype may copy just the ones it needs (each includes only what it uses).
#pragma once

#include "core.hpp"               // errors, printing once, timing        (stage 0)
#include "gpt.hpp"                // the model, GPT-2 and Llama flavours   (stage 0)
#include "train.hpp"              // AdamW, LR schedule, clipping, metrics (stage 0)
#include "indexed_dataset.hpp"    // Megatron .bin/.idx files             (stage 0)
#include "data.hpp"               // splits, samples, sampler, tokenizer   (stage 0)
#include "generate.hpp"           // sampling text                         (stage 0)
#include "collectives.hpp"        // counted, portable collectives         (stage 1)
#include "process_groups.hpp"     // launcher env, rendezvous, rank grid   (stage 1)
#include "data_parallel.hpp"      // gradient all-reduce in buckets        (stage 1)
#include "trainer.hpp"            // one training step for any layout      (stage 4)
