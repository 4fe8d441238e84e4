// lego-run's command line: its flags, --help, and the checks a value gets before anything
// of the run starts (each names the flag). Usage errors exit kExitLegoError (125).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/launch_contract.h"
#include "runtime/launcher/private_cluster.h"

namespace lego::launch {

struct Options {
  std::string config;  // absolute after parse_command_line
  long node = -1, memory_node = -1;
  // --excache, --policy, --prefetch, --delivery, --pcache: what the runtime gets (the
  // rest of it is filled in once the cluster is known).
  Settings runtime;
  // Without --config: the private cluster's (private_cluster.h has the defaults).
  fit::Provider transport = PrivateClusterOptions{}.transport;
  uint64_t memory_capacity = PrivateClusterOptions{}.memory_capacity;
  int memory_nodes = 1;   // --memory-nodes (private cluster)
  uint32_t replicas = 0;  // --replicas; 0: the cluster file's (the private cluster: 1)
  bool stats = false;
  bool syscalls = false;  // --syscalls: trace PROGRAM's system calls (syscalls.h)
  bool allow_local = false;
  std::string export_dir, mountpoint = "/lego";
  long storage_node = -1;
  bool no_storage = false;        // --storage-node none
  std::vector<std::string> argv;  // PROGRAM and its arguments
};

// Parses and checks the command line; exits on --help and on errors.
Options parse_command_line(int argc, char** argv);

// What lego-run can check before anything starts: a value the runtime would refuse in
// every process fails here, once, with the flag's name (the ExCache larger than this
// host's memory or its region).
void check_options(const Options& o);

// --pcache: opens /dev/lego_pcache and checks its ABI as the runtime would. A module the
// runtime would refuse (another ABI major, missing features) or no module at all fails
// --pcache on here with the reason; under --pcache auto a refused module is reported
// once on stderr and the run falls back to the userfaultfd-only path (o.runtime.pcache
// becomes "off", so no process of the run opens the device again).
void check_pcache(Options& o);

// Refuses a PROGRAM the runtime cannot reach (program_check.h), unless --allow-local
// (then warns once).
void check_program(const Options& o);

}  // namespace lego::launch
