// The one flag parser of lego's programs (include/lego/flags.h).
#include "lego/flags.h"

#include <getopt.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "lego/units.h"

namespace lego::flags {
namespace {

// Set by parse(): who says what went wrong, and with which status.
const char* g_program = "lego";
int g_usage_status = 2;

// "a, b or c" with `last` "or"; "a, b, c" with `last` nullptr.
std::string join(std::span<const char* const> items, const char* last) {
  std::string out;
  size_t i = 0;
  for (const char* item : items) {
    if (i > 0)
      out += last != nullptr && i + 1 == items.size() ? std::string(" ") + last + " " : ", ";
    out += item;
    i++;
  }
  return out;
}

bool one_of(const std::string& text, std::span<const char* const> choices) {
  for (const char* c : choices) {
    if (text == c) return true;
  }
  return false;
}

}  // namespace

int parse(int argc, char** argv, const Program& program, const std::vector<Flag>& flags) {
  g_program = program.name;
  g_usage_status = program.usage_status;
  // getopt_long's val for --help; flags[i] is kHelp + 1 + i.
  constexpr int kHelp = 1;
  std::vector<option> longopts;
  for (size_t i = 0; i < flags.size(); i++) {
    longopts.push_back({flags[i].name, flags[i].takes_arg ? required_argument : no_argument,
                        nullptr, static_cast<int>(kHelp + 1 + i)});
  }
  longopts.push_back({"help", no_argument, nullptr, kHelp});
  longopts.push_back({nullptr, 0, nullptr, 0});
  // "+": stop at the first operand. getopt names itself after argv[0] in its messages:
  // say the program's name instead, as every other message does.
  const char* optstring = program.stop_at_operand ? "+h" : "h";
  char* const argv0 = argc > 0 ? argv[0] : nullptr;
  if (argc > 0) argv[0] = const_cast<char*>(program.name);
  optind = 0;  // afresh (glibc: 0 also reinitialises its internal state)
  opterr = 1;
  int c;
  while ((c = getopt_long(argc, argv, optstring, longopts.data(), nullptr)) != -1) {
    if (c == 'h' || c == kHelp) {
      fputs(program.usage, stdout);
      exit(0);
    }
    if (c > kHelp && static_cast<size_t>(c - kHelp - 1) < flags.size()) {
      flags[static_cast<size_t>(c - kHelp - 1)].set(optarg);
      continue;
    }
    // getopt said which flag and what is wrong with it.
    fputs(program.usage, stderr);
    exit(program.usage_status);
  }
  if (argc > 0) argv[0] = argv0;
  return optind;
}

void usage_error(const std::string& message) {
  fprintf(stderr, "%s: %s\n", g_program, message.c_str());
  exit(g_usage_status);
}

long number(const char* flag, const char* text, long lo, long hi) {
  auto v = parse_int(text, flag, lo, hi);
  if (!v) usage_error(v.status().message());
  return v.value();
}

uint64_t size(const char* flag, const char* text, uint64_t min_bytes, const char* min_text) {
  auto v = parse_size(text, flag);
  if (!v) usage_error(v.status().message());
  if (v.value() < min_bytes) {
    usage_error(std::string(flag) + ": '" + text + "' is less than " +
                (min_text != nullptr ? min_text : std::to_string(min_bytes)));
  }
  return v.value();
}

std::string choice(const char* flag, const char* text, std::span<const char* const> choices) {
  if (!one_of(text, choices)) {
    usage_error(std::string(flag) + ": '" + text + "' is not " + join(choices, "or"));
  }
  return text;
}

std::vector<std::string> list(const char* flag, const char* text,
                              std::span<const char* const> choices) {
  std::vector<std::string> items = split_list(text);
  for (const std::string& item : items) {
    if (!one_of(item, choices)) {
      usage_error(std::string(flag) + ": unknown '" + item + "' (" + join(choices, nullptr) + ")");
    }
  }
  return items;
}

}  // namespace lego::flags
