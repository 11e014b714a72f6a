# One place for warnings and the helpers every component uses (in the spirit of
# abseil's absl_cc_library / absl_cc_test).
set(REMUS_COPTS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wno-missing-field-initializers)
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  list(APPEND REMUS_COPTS -Wthread-safety)
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

# remus_cc_test(NAME name SRCS ... DEPS ...): a GoogleTest binary registered with CTest.
function(remus_cc_test)
  cmake_parse_arguments(R "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${R_NAME} ${R_SRCS})
  target_compile_options(${R_NAME} PRIVATE ${REMUS_COPTS})
  target_link_libraries(${R_NAME} PRIVATE ${R_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  target_compile_definitions(${R_NAME} PRIVATE REMUS_TEST_DATA="${PROJECT_SOURCE_DIR}/tests/data")
  gtest_discover_tests(${R_NAME} PROPERTIES LABELS unit DISCOVERY_TIMEOUT 30)
endfunction()
include(GoogleTest)
