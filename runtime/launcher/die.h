// lego-run's own failures: "lego-run: what" on stderr, the run's set-up undone, and exit
// with lego-run's status for them (launch_contract.h: kExitLegoError, 125) or another.
//
// Thread-safety: main thread only.
#pragma once

#include <string>

#include "runtime/launch_contract.h"

namespace lego::launch {

[[noreturn]] void die(const std::string& message, int code = kExitLegoError);
// What die() undoes before it exits: set by main() once the run's parts exist. Runs once.
void set_undo(void (*undo)());

}  // namespace lego::launch
