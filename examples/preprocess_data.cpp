// build/examples/preprocess_data --input data/fortunes.ids --output-prefix data/fortunes_text_document --append-eod --vocab-size 2048
//
// Turns token ids (one document a line, space-separated, as `spm_encode --output_format=id`
// prints them) into a Megatron-compatible indexed dataset: PREFIX.bin and PREFIX.idx.
// Empty lines are skipped. scripts/prepare_corpus.sh runs this as the last step of `make data`.
#include <lightron/data.hpp>

#include <lightron/cli.hpp>

#include <fstream>
#include <sstream>

int main(int argc, char** argv) {
  return lightron::run_main([&] {
    CLI::App app{"Token ids (one document a line) -> Megatron indexed dataset (.bin/.idx)"};
    std::string input, output_prefix;
    bool append_eod = false;
    int64_t eod_id = 2;  // SentencePiece's </s>
    int64_t vocab_size = 0;
    app.add_option("--input", input, "text file of token ids, one document a line")->required();
    app.add_option("--output-prefix", output_prefix, "writes PREFIX.bin and PREFIX.idx")
        ->required();
    app.add_flag("--append-eod", append_eod, "end every document with --eod-id");
    app.add_option("--eod-id", eod_id, "end-of-document id")->capture_default_str();
    app.add_option("--vocab-size", vocab_size, "ids must be below it; < 65500 stores uint16")
        ->required();
    if (auto exit_code = lightron::parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    lightron::require(vocab_size > 0, "--vocab-size ({}) must be positive", vocab_size);
    lightron::require(!append_eod || (eod_id >= 0 && eod_id < vocab_size),
                      "--eod-id ({}) must be below --vocab-size ({})", eod_id, vocab_size);
    std::ifstream in(input);
    lightron::require(in.good(), "--input {}: file not found; make it with `spm_encode "
                      "--output_format=id` (see scripts/prepare_corpus.sh)", input);

    lightron::Timer timer;
    const auto dtype = lightron::dtype_for_vocab(vocab_size);
    lightron::IndexedDatasetWriter writer(output_prefix, dtype);
    std::vector<int64_t> tokens;
    int64_t line_number = 0, skipped = 0;
    for (std::string line; std::getline(in, line);) {
      ++line_number;
      tokens.clear();
      std::istringstream ids(line);
      std::string id;
      while (ids >> id) {
        size_t used = 0;
        int64_t value = -1;
        try { value = std::stoll(id, &used); } catch (const std::exception&) { used = 0; }
        lightron::require(used == id.size() && value >= 0 && value < vocab_size,
                          "--input {} line {}: '{}' is not a token id in [0, --vocab-size {})",
                          input, line_number, id, vocab_size);
        tokens.push_back(value);
      }
      if (tokens.empty()) { ++skipped; continue; }
      if (append_eod) tokens.push_back(eod_id);
      writer.add_document(tokens);
    }
    writer.finalize();
    fmt::print("{} documents ({} empty lines skipped), {} tokens as {} in {:.1f} s\n",
               writer.num_documents(), skipped, writer.num_tokens(),
               dtype == lightron::TokenDtype::kUInt16 ? "uint16" : "int32", timer.seconds());
    fmt::print("wrote {0}.bin and {0}.idx\n", output_prefix);
    return 0;
  });
}
