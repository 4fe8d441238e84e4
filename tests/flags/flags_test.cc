// The one flag parser (include/lego/flags.h) every lego program uses. Guards: each flag
// reaching its setter in command-line order (--name VALUE, --name=VALUE, a switch, an
// unambiguous prefix); --help and -h printing the usage on stdout with status 0; an
// unknown flag or a missing argument printing the usage on stderr with the program's own
// status (2 for the daemons, 125 for lego-run); stopping at the first operand when the
// program asks (lego-run: PROGRAM's flags are PROGRAM's) and permuting otherwise; the
// value parsers' messages naming the flag and what it takes; parse() callable again.
// Each case that exits runs in a forked child whose stdout, stderr and status are checked.
#include "lego/flags.h"

#include <catch2/catch.hpp>
#include <functional>
#include <string>
#include <vector>

#include "tests/support.h"

namespace flags = lego::flags;
using lego::testing::in_child;
using lego::testing::Outcome;

namespace {

const char* kUsage = "usage: prog [options] ARGS\n";

// What a parse saw.
struct Seen {
  std::vector<std::string> events;  // "name=value" or "name" in order
  int first = -1;
  std::vector<std::string> operands;
};

Seen parse(std::vector<std::string> args, bool stop_at_operand = false, int status = 2) {
  Seen seen;
  args.insert(args.begin(), "/some/path/prog");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  auto value = [&](const char* name) {
    return [&seen, name](const char* v) {
      seen.events.push_back(std::string(name) + (v != nullptr ? std::string("=") + v : ""));
    };
  };
  const std::vector<flags::Flag> table = {
      {"config", true, value("config")},
      {"verbose", false, value("verbose")},
      {"excache", true, value("excache")},
  };
  const int argc = static_cast<int>(args.size());
  seen.first = flags::parse(argc, argv.data(), {"prog", kUsage, status, stop_at_operand}, table);
  for (int i = seen.first; i < argc; i++) seen.operands.push_back(argv[static_cast<size_t>(i)]);
  // getopt names itself after argv[0]: it is given back.
  CHECK(std::string(argv[0]) == "/some/path/prog");
  return seen;
}

}  // namespace

TEST_CASE("each flag reaches its setter in order; operands are left") {
  Seen s = parse({"--config", "a.toml", "--verbose", "--excache=64M", "op1", "--conf", "b"});
  CHECK(s.events ==
        std::vector<std::string>{"config=a.toml", "verbose", "excache=64M", "config=b"});
  CHECK(s.operands == std::vector<std::string>{"op1"});
  // "--" ends the flags.
  s = parse({"--verbose", "--", "--config", "x"});
  CHECK(s.events == std::vector<std::string>{"verbose"});
  CHECK(s.operands == std::vector<std::string>{"--config", "x"});
  // Again in the same process: getopt starts afresh.
  s = parse({"--verbose"});
  CHECK(s.events == std::vector<std::string>{"verbose"});
  CHECK(s.operands.empty());
}

TEST_CASE("stop_at_operand leaves everything after the first operand alone") {
  Seen s = parse({"--verbose", "python3", "--config", "x"}, /*stop_at_operand=*/true);
  CHECK(s.events == std::vector<std::string>{"verbose"});
  CHECK(s.operands == std::vector<std::string>{"python3", "--config", "x"});
  // PROGRAM's own -h and unknown flags are PROGRAM's: no help, no usage error.
  Outcome o = in_child([] {
    Seen t = parse({"python3", "-h", "--bogus"}, /*stop_at_operand=*/true, 125);
    return t.operands.size() == 3 ? 99 : 98;
  });
  CHECK(o.status == 99);
  CHECK(o.out.empty());
  CHECK(o.err.empty());
}

TEST_CASE("--help, -h, unknown flags and missing arguments exit with the program's status") {
  struct Case {
    std::vector<std::string> args;
    int usage_status;
    int status;
    std::string out, err;  // err: a substring
  } cases[] = {
      {{"--help"}, 2, 0, kUsage, ""},
      {{"-h"}, 125, 0, kUsage, ""},
      {{"--bogus"}, 2, 2, "", "prog: unrecognized option '--bogus'\n" + std::string(kUsage)},
      {{"--bogus"}, 125, 125, "", kUsage},
      {{"--config"}, 2, 2, "", "prog: option '--config' requires an argument"},
      {{"--verbose=1"}, 125, 125, "", "doesn't allow an argument"},
      {{"-x"}, 2, 2, "", "prog: invalid option -- 'x'"},
  };
  for (auto& c : cases) {
    INFO(c.args[0] << " with usage status " << c.usage_status);
    Outcome o = in_child([&] {
      parse(c.args, false, c.usage_status);
      return 99;
    });
    CHECK(o.status == c.status);
    CHECK(o.out == c.out);
    CHECK(o.err.find(c.err) != std::string::npos);
  }
}

constexpr const char* kPolicies[] = {"fifo", "clock"};
constexpr const char* kModes[] = {"auto", "on", "off"};

TEST_CASE("the value parsers name the flag and what it takes") {
  CHECK(flags::number("--n", "42", 0, 100) == 42);
  CHECK(flags::size("--s", "64M") == uint64_t{64} << 20);
  CHECK(flags::choice("--policy", "clock", kPolicies) == "clock");
  CHECK(flags::list("--modes", "on,,off", kModes) == std::vector<std::string>{"on", "off"});
  struct Case {
    std::function<void()> parse;
    std::string err;
  } cases[] = {
      {[] { flags::number("--prefetch", "-1", 0, 31); },
       "prog: --prefetch: '-1' is not a number in 0..31\n"},
      {[] { flags::number("--prefetch", "3x", 0, 31); },
       "prog: --prefetch: '3x' is not a number in 0..31\n"},
      {[] { flags::size("--excache", "abc"); },
       "prog: --excache: 'abc' is not a size (examples: 4096, 64M, 1G)\n"},
      {[] { flags::size("--excache", "4K", 65536, "64K (16 lines)"); },
       "prog: --excache: '4K' is less than 64K (16 lines)\n"},
      {[] { flags::choice("--policy", "lru", kPolicies); },
       "prog: --policy: 'lru' is not fifo or clock\n"},
      {[] { flags::choice("--pcache", "x", kModes); },
       "prog: --pcache: 'x' is not auto, on or off\n"},
      {[] { flags::list("--modes", "on,maybe", kModes); },
       "prog: --modes: unknown 'maybe' (auto, on, off)\n"},
      {[] { flags::usage_error("no PROGRAM given"); }, "prog: no PROGRAM given\n"},
  };
  for (auto& c : cases) {
    INFO(c.err);
    Outcome o = in_child([&] {
      parse({}, false, 125);  // names the program "prog", usage status 125
      c.parse();
      return 99;
    });
    CHECK(o.status == 125);
    CHECK(o.err == c.err);
  }
}
