// lightron/lightron.hpp — everything, one include. Each header below is one chapter; a
// prototype may copy just the ones it needs (each includes only what it uses).
#pragma once

#include "core.hpp"               // errors, printing once, timing        (stage 0)
#include "gpt.hpp"                // the model, GPT-2 and Llama flavours   (stage 0)
#include "train.hpp"              // AdamW, LR schedule, clipping, metrics (stage 0)
#include "tensorboard.hpp"        // TensorBoard event files by hand       (stage 4)
#include "indexed_dataset.hpp"    // Megatron .bin/.idx files             (stage 0)
#include "data.hpp"               // splits, samples, sampler, tokenizer   (stage 0)
#include "generate.hpp"           // sampling text                         (stage 0)
#include "collectives.hpp"        // counted, portable collectives         (stage 1)
#include "process_groups.hpp"     // launcher env, rendezvous, rank grid   (stage 1)
#include "data_parallel.hpp"      // gradient all-reduce in buckets        (stage 1)
#include "tensor_parallel.hpp"    // f, g, column/row/vocab-parallel layers (stage 2)
#include "tp_model.hpp"           // apply_tensor_parallel                 (stage 2)
#include "pipeline_parallel.hpp"  // who holds which layers                 (stage 3)
#include "pipeline_schedule.hpp"  // AFAB, 1F1B, interleaved; the timeline  (stage 3)
#include "safetensors.hpp"        // the file format, CRC-32, atomic writes (stage 5)
#include "checkpoint.hpp"         // sharded save: shards, manifest, commit (stage 5)
#include "checkpoint_load.hpp"    // load under any layout (resharding)    (stage 5)
#include "hf_export.hpp"          // HuggingFace GPT-2 / Llama directories (stage 5)
#include "memory.hpp"             // per-rank memory before allocating     (stage 3)
#include "trainer.hpp"            // one training step for any layout      (stage 4)
