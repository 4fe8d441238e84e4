// Which programs lego's runtime can reach. LD_PRELOAD reaches only dynamically linked
// programs of lego's ELF class, and the loader ignores it in secure-execution mode
// (set-user-ID or set-group-ID to another user or group, file capabilities): such a
// PROGRAM's memory would all be local. lego-run refuses it unless --allow-local.
//
// Thread-safety: pure functions of the file system.
#pragma once

#include <string>

namespace lego::launch {

// Where execvp will find `name`: itself when it holds a '/', else the first executable
// regular file of that name along PATH (glibc's default when PATH is unset). "" when
// there is none: exec then says what is wrong.
std::string resolve_program(const std::string& name);

// Why the runtime could not be preloaded into the program at `path` ("is statically
// linked"), or "" when it can (or the file is not a program: exec says so). A "#!" script
// is judged by its interpreter.
std::string local_only_reason(const std::string& path, int depth = 0);

}  // namespace lego::launch
