# One place for warnings and the helpers every component uses (in the spirit of
# abseil's absl_cc_library / absl_cc_test).
set(REMUS_COPTS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wno-missing-field-initializers)
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  # Every clang build is a thread-safety check (common/thread_annotations.h):
  # scripts/sanitize.sh's ASan build compiles every file, the benchmarks
  # included, so scripts/test.sh needs no separate pass for it.
  list(APPEND REMUS_COPTS -Wthread-safety -Werror=thread-safety)
endif()
# Test code (remus_cc_test) is compiled for build time, not speed: the code
# under test is the libraries', built with the build type's flags. -O1 keeps
# gcc's flow warnings (-Wmaybe-uninitialized); line tables keep file:line in
# a failure's backtrace. In sanitizer builds -O0: the sanitizers see every
# access, and clang instruments an unoptimized test file 2.6x faster.
# (Measured on the 2-core machine: qmp_test.cc 31.6 s at -O2 -g, 16.6 s at
# -O1 -g1; domain_test.cc under ASan 38.7 s at -O1, 14.8 s at -O0.)
if(REMUS_SANITIZE)
  set(REMUS_TEST_COPTS -O0)
elseif(CMAKE_BUILD_TYPE MATCHES "^(RelWithDebInfo|Release|MinSizeRel)$")
  set(REMUS_TEST_COPTS -O1 -g1)
else()
  set(REMUS_TEST_COPTS)
endif()
# Sanitizers (REMUS_SANITIZE, see the top CMakeLists.txt). UBSan findings are
# fatal (-fno-sanitize-recover) so that they fail the test that hits them.
if(REMUS_SANITIZE STREQUAL "thread")
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
elseif(REMUS_SANITIZE STREQUAL "address" OR REMUS_SANITIZE MATCHES "^(ON|On|on|TRUE|True|true|YES|Yes|yes|Y|y|1)$")
  add_compile_options(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
elseif(REMUS_SANITIZE)
  message(FATAL_ERROR "REMUS_SANITIZE=${REMUS_SANITIZE}: expected OFF, ON, address or thread")
endif()

# remus_cc_library(NAME name SRCS ... DEPS ...)
function(remus_cc_library)
  cmake_parse_arguments(R "" "NAME" "SRCS;DEPS" ${ARGN})
  add_library(${R_NAME} STATIC ${R_SRCS})
  target_compile_options(${R_NAME} PRIVATE ${REMUS_COPTS})
  target_include_directories(${R_NAME} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${R_NAME} PUBLIC ${R_DEPS})
endfunction()

# remus_cc_test(NAME name SRCS ... DEPS ... [PREFIX p]): a GoogleTest binary
# registered with CTest, each test's name prefixed with p (so that, say,
# `ctest -R diskmirror` selects exactly a component's tests).
function(remus_cc_test)
  cmake_parse_arguments(R "" "NAME;PREFIX" "SRCS;DEPS" ${ARGN})
  add_executable(${R_NAME} ${R_SRCS})
  target_compile_options(${R_NAME} PRIVATE ${REMUS_COPTS} ${REMUS_TEST_COPTS})
  target_link_libraries(${R_NAME} PRIVATE ${R_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  target_compile_definitions(${R_NAME} PRIVATE REMUS_TEST_DATA="${PROJECT_SOURCE_DIR}/tests/data")
  gtest_discover_tests(${R_NAME} TEST_PREFIX "${R_PREFIX}" PROPERTIES LABELS unit DISCOVERY_TIMEOUT 30)
endfunction()

# remus_test_tool(NAME name SRCS ... DEPS ...): a program only tests run
# (compiled like test code, see REMUS_TEST_COPTS).
function(remus_test_tool)
  cmake_parse_arguments(R "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${R_NAME} ${R_SRCS})
  target_compile_options(${R_NAME} PRIVATE ${REMUS_COPTS} ${REMUS_TEST_COPTS})
  target_link_libraries(${R_NAME} PRIVATE ${R_DEPS})
endfunction()
include(GoogleTest)
