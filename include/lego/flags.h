// Command-line flags, one parser for every lego program (lego-run, the daemons, lego-fs,
// the benchmarks, the test tools).
//
// A program lists its flags as a table of {name, takes an argument?, what to do with
// it} and hands it to parse() with its usage text. getopt_long does the parsing, so
// every program accepts what GNU tools accept: --name VALUE, --name=VALUE, an
// unambiguous prefix of a name, -h, and "--" to end the flags. parse() adds --help and
// -h, which print the usage text on stdout and exit 0.
//
// A usage error -- an unknown flag, a missing argument, a value a flag refuses -- prints
// "PROGRAM: what is wrong" (getopt's own message for the first two, then the usage text)
// on stderr and exits with the program's usage status: 2 for the daemons and benchmarks,
// 125 for lego-run (whose other statuses are PROGRAM's). The value parsers below name the
// flag and what it takes ("lego-run: --prefetch: '-1' is not a number in 0..31").
//
// Thread-safety: parse() and the parsers use process-wide state (getopt's, and the
// program it was last given): call them from the main thread, at start. parse() may be
// called again (tests do): it starts getopt afresh.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace lego::flags {

// One long flag, --name.
struct Flag {
  const char* name;  // without the dashes: "excache"
  bool takes_arg;    // --name VALUE, or a switch
  // Called in command-line order with the value (nullptr for a switch). It may call
  // usage_error() or the parsers below.
  std::function<void(const char* value)> set;
};

struct Program {
  const char* name;   // "lego-run": every message starts with it
  const char* usage;  // the --help text
  // The exit status of a usage error.
  int usage_status = 2;
  // Stop at the first operand, leaving everything after it alone (lego-run: PROGRAM's
  // own flags are PROGRAM's). Otherwise flags may follow operands, as getopt permutes.
  bool stop_at_operand = false;
};

// Parses argv's flags, calling each Flag's `set`. Returns the index of the first
// operand (argc when there is none). Exits on --help and on usage errors (above).
int parse(int argc, char** argv, const Program& program, const std::vector<Flag>& flags);

// "PROGRAM: message" on stderr, then exit with the usage status of the program last
// given to parse() (2, and "lego", before any).
[[noreturn]] void usage_error(const std::string& message);

// The value of `flag` given as `text`, or a usage error naming both.
// A decimal integer in [lo, hi]: "--prefetch: '-1' is not a number in 0..31".
long number(const char* flag, const char* text, long lo, long hi);
// A size ("4096", "64K", "64M", "1G"; lego/units.h parse_size) of at least min_bytes:
// "--excache: '1K' is less than 64K" (min_text names the minimum).
uint64_t size(const char* flag, const char* text, uint64_t min_bytes = 0,
              const char* min_text = nullptr);
// One of `choices` (an array of names): "--policy: 'lru' is not fifo or clock".
std::string choice(const char* flag, const char* text, std::span<const char* const> choices);
// A comma-separated list of `choices` (empty items dropped):
// "--workloads: unknown 'x' (random, sequential, zipf, random_mt)".
std::vector<std::string> list(const char* flag, const char* text,
                              std::span<const char* const> choices);

}  // namespace lego::flags
