// lightron/cli.hpp — the programs' command lines, parsed with CLI11: --help prints (rank 0)
// and exits 0; a bad flag becomes one line, "error: ... (see --help)", from rank 0, exit 2
// (run_main turns the UsageError into that). Every program also gets --no-blas-fix: without
// it, a program on a CPU whose OpenBLAS fell back to an old kernel restarts itself with the
// right one (blas.hpp). Plumbing: skim it.
#pragma once

#include "blas.hpp"        // fix_blas_kernel
#include "core.hpp"        // UsageError, print0, first_line
#include "rendezvous.hpp"  // launch_env: which rank prints

#include <CLI/CLI.hpp>

#include <optional>

namespace lightron {

// Parses argv into `app`: nothing to go on, or the exit code after --help.
//   if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;
inline std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv) {
  global_rank() = launch_env().rank;  // so that only rank 0 prints, before any group exists
  bool no_blas_fix = false;
  app.add_flag("--no-blas-fix", no_blas_fix, "keep the BLAS kernel OpenBLAS chose, even an old one (blas.hpp)");
  try {
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
