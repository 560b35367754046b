// lightron/tokenizer.hpp — SentencePiece without libsentencepiece (linking it next to
// libtorch crashes before main: their bundled protobufs clash). Decoding reads the `.vocab`
// file that spm_train writes; encoding runs the `spm_encode` command-line tool.
// Introduced in chapter 0.
#pragma once

#include "core.hpp"

#include <cstdio>   // popen
#include <cstdlib>  // mkstemp
#include <filesystem>
#include <fstream>
#include <sstream>

#include <unistd.h>  // close

namespace lightron {


// data/tokenizer.model -> data/tokenizer.vocab (spm_train writes both).
inline std::string spm_vocab_path(const std::string& model_path) {
  const auto dot = model_path.rfind(".model");
  return (dot == std::string::npos ? model_path : model_path.substr(0, dot)) + ".vocab";
}

// The pieces of a SentencePiece `.vocab` file ("piece<TAB>score", id = line number).
class SpmVocab {
 public:
  explicit SpmVocab(const std::string& path) {
    std::ifstream in(path);
    require(in.good(), "{}: file not found; run `make data` or scripts/prepare_corpus.sh", path);
    for (std::string line; std::getline(in, line);)
      pieces_.push_back(line.substr(0, line.find('\t')));
    require(!pieces_.empty(), "{}: no pieces; run scripts/prepare_corpus.sh again", path);
  }

  int64_t size() const { return static_cast<int64_t>(pieces_.size()); }
  const std::string& piece(int64_t id) const { return pieces_.at(static_cast<size_t>(id)); }

  // "▁" (U+2581) -> ' ', "<n>" -> '\n', "<0xNN>" -> that byte; <s>, </s>, <unk> and ids past
  // the vocabulary (a model's padded rows) -> nothing. The leading space is kept.
  std::string decode(const std::vector<int64_t>& ids) const {
    static const std::string kSpace = "\xE2\x96\x81";  // U+2581 in UTF-8
    std::string text;
    for (int64_t id : ids) {
      if (id < 0 || id >= size()) continue;
      const std::string& p = pieces_[static_cast<size_t>(id)];
      if (p == "<s>" || p == "</s>" || p == "<unk>") continue;
      if (p == "<n>") { text += '\n'; continue; }
      if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>') {
        text += static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16));
        continue;
      }
      for (size_t at = 0; at < p.size();) {
        if (p.compare(at, kSpace.size(), kSpace) == 0) text += ' ', at += kSpace.size();
        else text += p[at++];
      }
    }
    return text;
  }

 private:
  std::vector<std::string> pieces_;
};

// Token ids of `text` from the `spm_encode` command-line tool (newlines become "<n>", as in
// scripts/prepare_corpus.sh, so the text is one line).
inline std::vector<int64_t> encode_with_cli(const std::string& model_path,
                                            const std::string& text) {
  require(std::filesystem::is_regular_file(model_path),
          "{}: file not found; run `make data` or scripts/prepare_corpus.sh", model_path);
  auto quote = [](const std::string& s) {  // for /bin/sh: 'it'\''s'
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  };
  std::string input = (std::filesystem::temp_directory_path() / "lightron_spm_XXXXXX").string();
  const int fd = ::mkstemp(input.data());  // a fresh file, even with several threads
  require(fd >= 0, "{}: cannot create a temporary file for spm_encode", input);
  ::close(fd);
  {
    std::ofstream out(input);
    for (char c : text) c == '\n' ? out << "<n>" : out << c;
    out << '\n';
  }
  const std::string command = fmt::format(
      "spm_encode --model={} --output_format=id < {} 2>/dev/null", quote(model_path), quote(input));
  std::string output;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe) {
    char buffer[4096];
    for (size_t got; (got = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0;)
      output.append(buffer, got);
  }
  const int status = pipe ? ::pclose(pipe) : -1;
  std::filesystem::remove(input);
  require(status == 0, "{}: `spm_encode` failed (status {}); install the Debian package "
          "sentencepiece or check the model path", model_path, status);
  std::vector<int64_t> ids;
  std::istringstream in(output);
  for (int64_t id; in >> id;) ids.push_back(id);
  return ids;
}

}  // namespace lightron
