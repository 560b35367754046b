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

add_test(NAME failure COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/failure_test.sh ${PROJECT_BINARY_DIR})
