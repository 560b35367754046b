// lightron/cli.hpp — the programs' command lines, parsed with CLI11: --help prints (rank 0)
// and exits 0; a bad flag becomes one line, "error: ... (see --help)", from rank 0, exit 2
// (run_main turns the UsageError into that). Every program also gets --no-blas-fix: without
// it, a program on a CPU whose OpenBLAS fell back to an old kernel restarts itself with the
// right one (blas.hpp).
// A --config TOML file is checked here first, line by line, against the program's own
// options: CLI11 (2.1) reads whatever it can (a line without '=' becomes a switch, an unknown
// key or a [table] is skipped, `swiglu = 3` turns the switch on), so lightron refuses the
// file instead, naming the file, the line and the key. The subset of TOML that flags need:
// `key = 4`, `key = 1e-3`, `key = true`, `key = "text"` (or 'text'), comments; no tables,
// no arrays, no key twice. And "-1" for an unsigned option (--seed) is refused, not wrapped
// to 2^64 - 1. Plumbing: skim it.
#pragma once

#include "blas.hpp"        // fix_blas_kernel
#include "core.hpp"        // UsageError, print0, first_line
#include "rendezvous.hpp"  // launch_env: which rank prints

#include <CLI/CLI.hpp>

#include <cctype>  // isalnum, isspace
#include <cerrno>  // ERANGE
#include <cstdlib>  // strtoll
#include <filesystem>
#include <fstream>
#include <algorithm>  // replace
#include <map>
#include <optional>
#include <regex>

namespace lightron {

// One `key = value` line of a --config file: the key ("" on a blank or comment line), the
// value's TOML kind and its text as written.
struct TomlLine {
  enum Kind { kInteger, kFloat, kBool, kString } kind = kString;
  std::string key, value;
};

// Parses one line; `where` ("FILE:LINE") starts every error.
inline TomlLine parse_toml_line(const std::string& line, const std::string& where) {
  size_t i = 0;
  auto skip_space = [&] { while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i]))) ++i; };
  auto fail = [&](const std::string& what) { throw UsageError(fmt::format("{}: {}", where, what)); };
  auto quoted = [&](char quote) {  // from the opening quote; a basic "string" may escape \"
    const size_t start = ++i;
    while (i < line.size() && line[i] != quote) i += quote == '"' && line[i] == '\\' ? 2 : 1;
    if (i >= line.size()) fail(fmt::format("unterminated string {}", line.substr(start - 1)));
    return line.substr(start, i++ - start);
  };
  TomlLine out;
  skip_space();
  if (i == line.size() || line[i] == '#') return out;
  if (line[i] == '[') fail(fmt::format("'{}': tables are not supported; write every setting at the top level", line));
  if (line[i] == '"' || line[i] == '\'') {
    out.key = quoted(line[i]);
  } else {
    while (i < line.size() && (std::isalnum(static_cast<unsigned char>(line[i])) || line[i] == '-' || line[i] == '_'))
      out.key += line[i++];
  }
  skip_space();
  if (out.key.empty() || i == line.size() || line[i] != '=') fail(fmt::format("expected 'key = value', got '{}'", line));
  ++i, skip_space();
  if (i == line.size()) fail(fmt::format("{} has no value", out.key));
  if (line[i] == '"' || line[i] == '\'') {
    out.value = quoted(line[i]);
  } else if (line[i] == '[' || line[i] == '{') {
    fail(fmt::format("{}: arrays and inline tables are not supported; give one value", out.key));
  } else {
    while (i < line.size() && !std::isspace(static_cast<unsigned char>(line[i])) && line[i] != '#') out.value += line[i++];
    static const std::regex integer("[+-]?[0-9]+"), real("[+-]?([0-9]+(\\.[0-9]+)?([eE][+-]?[0-9]+)?|inf|nan)");
    if (out.value == "true" || out.value == "false") out.kind = TomlLine::kBool;
    else if (std::regex_match(out.value, integer)) out.kind = TomlLine::kInteger;
    else if (std::regex_match(out.value, real)) out.kind = TomlLine::kFloat;
    else fail(fmt::format("{} = {}: not a TOML value (text needs quotes: {} = \"{}\")", out.key, out.value, out.key, out.value));
  }
  skip_space();
  if (i < line.size() && line[i] != '#') fail(fmt::format("unexpected '{}' after the value of {}", line.substr(i), out.key));
  return out;
}

// Why `v` cannot set `option` ("" if it can), from the option's CLI11 type.
inline std::string toml_type_problem(const CLI::Option& option, const TomlLine& v) {
  const std::string type = option.get_type_name(), shown = v.kind == TomlLine::kString ? "\"" + v.value + "\"" : v.value;
  if (option.get_expected_max() == 0 && v.kind != TomlLine::kBool)
    return fmt::format("{} is a switch: write {} = true or {} = false, got {}", v.key, v.key, v.key, shown);
  if (option.get_expected_max() > 0 && v.kind == TomlLine::kBool) return fmt::format("{} is not a switch, got {}", v.key, shown);
  if ((type == "INT" || type == "UINT") && v.kind != TomlLine::kInteger)
    return fmt::format("{} must be an integer, got {}", v.key, shown);
  if (type == "UINT" && v.value[0] == '-') return fmt::format("{} must not be negative, got {}", v.key, shown);
  if (v.kind == TomlLine::kInteger) {
    errno = 0;
    if (type == "UINT") std::strtoull(v.value.c_str(), nullptr, 10);
    else std::strtoll(v.value.c_str(), nullptr, 10);
    if (errno == ERANGE) return fmt::format("{} = {} does not fit in a 64-bit integer", v.key, v.value);
  }
  if (type == "FLOAT" && v.kind != TomlLine::kInteger && v.kind != TomlLine::kFloat)
    return fmt::format("{} must be a number, got {}", v.key, shown);
  if (type == "TEXT" && v.kind != TomlLine::kString)
    return fmt::format("{} must be a quoted string: {} = \"{}\"", v.key, v.key, v.value);
  return "";
}

// Checks a --config file before CLI11 reads it: every key a configurable option of `app`,
// given once, with a value of its type. A missing file is left to CLI11 (it names it).
inline void check_config_file(const CLI::App& app, const std::string& path) {
  std::ifstream in(path);
  if (!in) return;
  std::map<std::string, int> seen;  // key -> line
  int number = 0;
  for (std::string line; std::getline(in, line);) {
    const std::string where = fmt::format("--config {}:{}", path, ++number);
    const TomlLine v = parse_toml_line(line, where);
    if (v.key.empty()) continue;
    const CLI::Option* option = app.get_option_no_throw("--" + v.key);
    if (option == nullptr || !option->get_configurable() || option == app.get_config_ptr() ||
        option == app.get_help_ptr() || option == app.get_help_all_ptr()) {
      std::string dashed = v.key;
      std::replace(dashed.begin(), dashed.end(), '_', '-');
      const bool hint = dashed != v.key && app.get_option_no_throw("--" + dashed) != nullptr;
      throw UsageError(fmt::format("{}: unknown key '{}'{} (see --help)", where, v.key,
                                   hint ? fmt::format(": did you mean {}?", dashed) : std::string(": not a flag of this program")));
    }
    const auto [first, fresh] = seen.emplace(v.key, number);
    require(fresh, "{}: {} is set twice (first on line {})", where, v.key, first->second);
    const std::string problem = toml_type_problem(*option, v);
    require(problem.empty(), "{}: {}", where, problem);
  }
}

// The value argv gives `option` (--name VALUE or --name=VALUE), if any.
inline std::optional<std::string> flag_value(const CLI::Option& option, int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    for (const auto& name : option.get_lnames()) {
      const std::string arg = argv[i], flag = "--" + name;
      if (arg == flag && i + 1 < argc) return std::string(argv[i + 1]);
      if (arg.rfind(flag + "=", 0) == 0) return arg.substr(flag.size() + 1);
    }
  return std::nullopt;
}

// Parses argv into `app`: nothing to go on, or the exit code after --help.
//   if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;
inline std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv) {
  global_rank() = launch_env().rank;  // so that only rank 0 prints, before any group exists
  bool no_blas_fix = false;
  app.add_flag("--no-blas-fix", no_blas_fix, "keep the BLAS kernel OpenBLAS chose, even an old one (blas.hpp)");
  const CLI::Validator not_negative([](std::string& value) {  // CLI11 reads "-1" as 2^64 - 1
    return value.find('-') == std::string::npos ? std::string() : "must not be negative, got " + value;
  }, "", "");
  for (CLI::Option* option : app.get_options())
    if (option->get_type_name() == "UINT") option->check(not_negative);
  try {
    if (const CLI::Option* config = app.get_config_ptr())
      if (const auto path = flag_value(*config, argc, argv)) check_config_file(app, *path);
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    print0("{}", app.help());
    return 0;
  } catch (const CLI::ParseError& e) {
    throw UsageError(first_line(e.what()) + " (see --help)");
  }
  if (!no_blas_fix) fix_blas_kernel(argv);  // returns unless OpenBLAS chose an old kernel
  return std::nullopt;
}

}  // namespace lightron
