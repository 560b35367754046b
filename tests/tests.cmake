# The test table: which suites run under how many ranks, and the script tests.
# (Included from tests/CMakeLists.txt, where lightron_mpi_test is defined.)
set(T $<TARGET_FILE:lightron_tests>)

lightron_mpi_test(mpi_dp_np2 2 ${T} --test-suite=mpi_dp)
lightron_mpi_test(mpi_dp_np4 4 ${T} --test-suite=mpi_dp)

add_test(NAME reference_check COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/reference_check.py
         --tests-binary ${T} --workdir ${CMAKE_CURRENT_BINARY_DIR}/reference)

lightron_mpi_test(mpi_tp_np2 2 ${T} --test-suite=mpi_tp)
lightron_mpi_test(mpi_tp_np4 4 ${T} --test-suite=mpi_tp)
lightron_mpi_test(mpi_tp_dp_np4 4 ${T} --test-suite=mpi_tp_dp)

lightron_mpi_test(mpi_pp_np2 2 ${T} --test-suite=mpi_pp)
lightron_mpi_test(mpi_pp_np4 4 ${T} --test-suite=mpi_pp)
lightron_mpi_test(mpi_pp_bubble_np4 4 ${T} --test-suite=mpi_pp_bubble)
lightron_mpi_test(mpi_pp_tp_np4 4 ${T} --test-suite=mpi_pp_tp)
lightron_mpi_test(mpi_pp_dp_np4 4 ${T} --test-suite=mpi_pp_dp)
lightron_mpi_test(mpi_3d_np8 8 ${T} --test-suite=mpi_3d)
# Activation recompute: bit-exact with none (tp 2 + SP, pp 2, dp 2; 2x2x2) and measured memory.
lightron_mpi_test(mpi_recompute_np2 2 ${T} --test-suite=mpi_recompute_np2)
lightron_mpi_test(mpi_recompute_np8 8 ${T} --test-suite=mpi_recompute_np8)

# Chapter 7, ZeRO: parity with data parallelism, memory and communication equal to the formulas.
lightron_mpi_test(mpi_zero_np2 2 ${T} --test-suite=mpi_zero)
lightron_mpi_test(mpi_zero_np4 4 ${T} --test-suite=mpi_zero)
lightron_mpi_test(mpi_zero_tp_np4 4 ${T} --test-suite=mpi_zero_tp)
lightron_mpi_test(mpi_zero_3d_np8 8 ${T} --test-suite=mpi_zero_3d)

# Chapter 8, context parallelism: ring attention equals whole-sequence attention, the
# head-tail split balances the work, every cp layout reproduces one rank, bytes and memory.
lightron_mpi_test(mpi_cp_np2 2 ${T} --test-suite=mpi_cp,mpi_cp_np2)
lightron_mpi_test(mpi_cp_np4 4 ${T} --test-suite=mpi_cp,mpi_cp_np4)
lightron_mpi_test(mpi_cp_np8 8 ${T} --test-suite=mpi_cp_np8)

# blas.hpp: a program on a CPU whose OpenBLAS fell back to an old kernel restarts with the
# right one; the user's OPENBLAS_CORETYPE and --no-blas-fix keep it (skipped without AVX2).
add_test(NAME blas_fix COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/blas_fix_test.sh ${PROJECT_BINARY_DIR})
set_tests_properties(blas_fix PROPERTIES SKIP_RETURN_CODE 77)
# Faults of a distributed run (tests/failure_test.sh: dead, stopped and missing ranks, a silent
# MASTER_PORT, a dead launcher, a save that fails on one rank): ~2 minutes, ports 32040-32055.
# Serial: its verdicts rest on heartbeats and timeouts, which a loaded machine would blur.
add_test(NAME failure COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/failure_test.sh ${PROJECT_BINARY_DIR})
set_tests_properties(failure PROPERTIES RUN_SERIAL ON TIMEOUT 600)
# guards.hpp under real ranks: a planted NaN named by its rank, a planted spike skipped alike,
# SIGTERM/SIGUSR1 save and exit 0 (then resume bit-exactly), failures before step 1.
add_test(NAME guards COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/guards_test.sh ${PROJECT_BINARY_DIR})
# Two hosts on one machine (network namespaces joined by a veth pair): torchrun- and
# Slurm-style launches across them train as one host does. Needs root: skipped (77) otherwise.
add_test(NAME two_hosts COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/two_hosts_test.sh ${PROJECT_BINARY_DIR})
set_tests_properties(two_hosts PROPERTIES SKIP_RETURN_CODE 77)

# Stage 5, checkpoints: resharding and in-process resume (np 8 and 4); resume in new
# processes, a crash mid-save and damaged files (script); HuggingFace export checked in Python.
lightron_mpi_test(mpi_ckpt_np8 8 ${T} --test-suite=mpi_ckpt_np8)
lightron_mpi_test(mpi_ckpt_np4 4 ${T} --test-suite=mpi_ckpt_np4)
add_test(NAME checkpoint COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/checkpoint_test.sh ${PROJECT_BINARY_DIR})
add_test(NAME hf_check COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/hf_check.py
         --build ${PROJECT_BINARY_DIR} --workdir ${CMAKE_CURRENT_BINARY_DIR}/hf_check --port 29995)

# Tools around the library: TensorBoard event files read back by an independent reader, a
# consumer project (installed + find_package, and add_subdirectory), the GPU check's dry run,
# the tutorials' commands.
add_test(NAME tensorboard COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/tensorboard_check.py --build ${PROJECT_BINARY_DIR})
add_test(NAME consumer COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/consumer/../consumer_test.sh ${PROJECT_SOURCE_DIR} ${CMAKE_CURRENT_BINARY_DIR}/consumer_work)
# bench/gpu_check.sh's logic at toy size on the CPU (the GPU machine runs it for real).
add_test(NAME gpu_check_dry_run COMMAND env PYTHON=/usr/bin/python3 BUILD=${PROJECT_BINARY_DIR} MASTER_PORT=${LIGHTRON_NEXT_PORT}
         OUT=${CMAKE_CURRENT_BINARY_DIR}/gpu_check_dry_run bash ${PROJECT_SOURCE_DIR}/bench/gpu_check.sh --cpu-dry-run)
math(EXPR LIGHTRON_NEXT_PORT "${LIGHTRON_NEXT_PORT} + 1")
# bench/profile_step.py's two traces and its table (a smoke test: the numbers are the bench's).
add_test(NAME profile_step COMMAND /usr/bin/python3 ${PROJECT_SOURCE_DIR}/bench/profile_step.py --build ${PROJECT_BINARY_DIR}
         --config tiny --top 5)
# bench/demo_speed.py's runs and tables at a few steps (a smoke test: the numbers are the bench's).
add_test(NAME demo_speed COMMAND /usr/bin/python3 ${PROJECT_SOURCE_DIR}/bench/demo_speed.py --build ${PROJECT_BINARY_DIR}
         --iters 12 --port ${LIGHTRON_NEXT_PORT})
math(EXPR LIGHTRON_NEXT_PORT "${LIGHTRON_NEXT_PORT} + 1")
add_test(NAME tutorials COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/tutorial_commands.py --root ${PROJECT_SOURCE_DIR} --timeout 600)
set_tests_properties(tutorials PROPERTIES RUN_SERIAL ON TIMEOUT 1800)

# The course notebooks (notebooks/*.ipynb), executed headlessly: each asserts what it plots and
# writes its figures to notebooks/figures/. Serial: they launch up to 8 ranks at a time.
add_test(NAME notebooks COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/run_notebooks.py --root ${PROJECT_SOURCE_DIR})
set_tests_properties(notebooks PROPERTIES RUN_SERIAL ON)

# Copying headers works as the README says: its per-header table matches the #include lines,
# and each row, copied alone into an empty folder, compiles with plain g++ (data_parallel.hpp
# also links and runs a one-rank Gloo group). Two compilers at a time, ~3 minutes.
add_test(NAME header_sets COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/header_sets_check.py
         --root ${PROJECT_SOURCE_DIR} --jobs 2)
set_tests_properties(header_sets PROPERTIES TIMEOUT 900 PROCESSORS 2)

# The headers that carry the course's ideas stay readable: no function longer than 60 lines,
# and the README's table of them (with line counts) is current.
add_test(NAME function_length COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/function_length_check.py
         --root ${PROJECT_SOURCE_DIR})

# Chapter 6, your own model: examples/06_your_own_model trains a model that is not lightron's
# GPT on tp 2, dp 2 and tp 2 x dp 2, checks every step against one rank (parity.hpp), and
# loads the layout's checkpoint back into one unsplit model, bit for bit. Exit 1 on any difference.
set(YOUR_MODEL $<TARGET_FILE:06_your_own_model>)
lightron_mpi_test(your_own_model_tp2 2 ${YOUR_MODEL} --tensor-model-parallel-size 2 --save ${CMAKE_CURRENT_BINARY_DIR}/your_own_model_tp2)
lightron_mpi_test(your_own_model_dp2 2 ${YOUR_MODEL} --save ${CMAKE_CURRENT_BINARY_DIR}/your_own_model_dp2)
lightron_mpi_test(your_own_model_tp2_dp2 4 ${YOUR_MODEL} --tensor-model-parallel-size 2 --save ${CMAKE_CURRENT_BINARY_DIR}/your_own_model_tp2_dp2)

# "Break it" exercises (tutorials 01-04): each plants one real bug (LIGHTRON_BREAK, core.hpp)
# and checks that the chapter's parity test catches it and names the first difference.
function(lightron_break_it_test bug np test_case)
  add_test(NAME break_${bug} COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/break_it_test.sh ${bug} ${np} ${test_case}
           ${LIGHTRON_MPIRUN} ${LIGHTRON_NEXT_PORT} $<TARGET_FILE:lightron_tests>)
  math(EXPR next "${LIGHTRON_NEXT_PORT} + 1")
  set(LIGHTRON_NEXT_PORT ${next} PARENT_SCOPE)
endfunction()
lightron_break_it_test(dp_average_twice 2 "dp parity: bucketed* one micro-batch per rank")
lightron_break_it_test(tp_f_backward 2 "tp parity: GPT-2")
lightron_break_it_test(skip_embedding_all_reduce 2 "pp parity: 1F1B*GPT-2")
lightron_break_it_test(skip_sp_grad_all_reduce 2 "tp parity: GPT-2 with sequence parallel")
lightron_break_it_test(cp_local_positions 2 "cp parity: cp = world size*")
