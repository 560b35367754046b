// convert_checkpoint — between lightron's sharded checkpoints (any layout) and HuggingFace
// model directories (config.json + model.safetensors, GPT2LMHeadModel or LlamaForCausalLM).
// One process: it reads every shard and reassembles the full tensors.
//
//   build/examples/convert_checkpoint --load runs/ckpt --export-hf runs/hf
//   build/examples/convert_checkpoint --import-hf runs/hf --save runs/ckpt_from_hf
//
// An imported checkpoint holds weights only (iteration 0, no AdamW state): pretrain_gpt
// --load reads it under any layout, e.g. to fine-tune.
#include <lightron/hf_export.hpp>

#include <lightron/cli.hpp>

using namespace lightron;

int main(int argc, char** argv) {
  return run_main([&] {
    std::string load, export_hf_dir, import_hf_dir, save;
    CLI::App app{"lightron: convert checkpoints to and from HuggingFace directories"};
    app.add_option("--load", load, "lightron checkpoint to export (a --save directory or one iter_* directory)");
    app.add_option("--export-hf", export_hf_dir, "HuggingFace directory to write");
    app.add_option("--import-hf", import_hf_dir, "HuggingFace directory to read");
    app.add_option("--save", save, "lightron checkpoint directory to write the import to");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    const bool exporting = !load.empty() && !export_hf_dir.empty(), importing = !import_hf_dir.empty() && !save.empty();
    require(exporting != importing, "give either --load DIR --export-hf DIR or --import-hf DIR --save DIR");
    if (exporting) {
      CheckpointReader reader(load);
      const GPTConfig config = config_from_json(reader.manifest.at("config"));
      export_hf(export_hf_dir, config, reader.consolidate(/*with_optimizer=*/false));
      fmt::print("exported {} ({}, iteration {}) to {} as HuggingFace {}\n", reader.path,
                 reader.manifest.at("layout").dump(), reader.manifest.at("iteration").get<int64_t>(), export_hf_dir,
                 hf_config(config).at("architectures")[0].get<std::string>());
    } else {
      const auto m = import_hf(import_hf_dir);
      save_weights(save, m.config, m.weights);
      fmt::print("imported {} ({} layers, hidden {}, vocab {}) into {}\n", import_hf_dir, m.config.num_layers,
                 m.config.hidden_size, m.config.vocab_size, iteration_dir(save, 0));
    }
    return 0;
  });
}
