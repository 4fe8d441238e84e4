// lego-run's exit on its own failures (runtime/launcher/die.h).
#include "runtime/launcher/die.h"

#include <cstdio>
#include <cstdlib>

namespace lego::launch {
namespace {

void (*g_undo)() = nullptr;

}  // namespace

void set_undo(void (*undo)()) {
  g_undo = undo;
}

void die(const std::string& message, int code) {
  fprintf(stderr, "lego-run: %s\n", message.c_str());
  if (void (*undo)() = g_undo) {
    g_undo = nullptr;
    undo();
  }
  exit(code);
}

}  // namespace lego::launch
