// The plumbing lego's daemons share: lego-memd, lego-stord and lego-fs parse their flags,
// load the cluster file, find their node in it, answer --status, stop on a signal and
// report readiness the same way, through these helpers; run_node() (below) is a node
// daemon's whole main() around its service.
//
// Errors: these are for a daemon's main(). A helper that cannot go on prints
// "PROGRAM: what went wrong" on stderr and exits: status kExitUsage (2) for a bad
// command line or cluster file, kExitFailure (1) for anything else. Nothing here
// returns an error to handle.
//
// Thread-safety: call from the main thread, before starting others (set_program,
// parse_flags, install_stop_handlers, run_node); stop_requested() may be read from any
// thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lego/fit.h"
#include "lego/flags.h"
#include "lego/metrics.h"

namespace lego::daemon {

inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// The name messages start with ("lego-stord"); parse_flags sets it too.
void set_program(const char* name);
// "PROGRAM: msg" on stderr, then exit(code).
[[noreturn]] void die(const std::string& msg, int code = kExitFailure);

// A number in [lo, hi] or a size ("64M") given to `flag`; dies with kExitUsage if not
// (lego/flags.h's parsers).
long number(const char* flag, const char* text, long lo, long hi);
uint64_t size(const char* flag, const char* text);

// One long option: "--name" (with an argument when takes_arg), handed to `set`
// (nullptr without an argument): lego/flags.h's.
using Flag = flags::Flag;

// lego/flags.h's parse() for a daemon: `flags`, and -h/--help, which prints `usage` on
// stdout and exits 0. An unknown option or a missing argument prints `usage` on stderr
// and exits kExitUsage. Returns the index of the first non-option argument (options may
// follow operands, as getopt_long permutes). Sets the program's name (set_program).
int parse_flags(int argc, char** argv, const char* program, const char* usage,
                const std::vector<Flag>& flags);

// The flags every node daemon has, and the flags that fill them.
struct NodeFlags {
  std::string config;   // --config FILE
  long node = -1;       // --node ID
  int ready_fd = -1;    // --ready-fd FD
  bool status = false;  // --status
  long as = -1;         // --as ID (with --status)
};
// --config, --node, --ready-fd, and with `with_status` --status and --as.
std::vector<Flag> node_flags(NodeFlags& f, bool with_status);

// The cluster file at `path`; dies with kExitUsage when it cannot be read or parsed.
fit::ClusterConfig load_config(const std::string& path);
// A node daemon's start after parse_flags returned `first`: dies with kExitUsage on a
// stray operand, without --config and --node, or when the node is not in the file.
// Returns the cluster file.
fit::ClusterConfig load_node_config(int argc, char** argv, int first, const NodeFlags& f);
// Node `id` of `config` (read from `path`), which must have `role`; dies with
// kExitUsage naming what is wrong ("node 3 is a memory node in c.toml, not a storage
// node").
const fit::NodeConfig& node_of_role(const fit::ClusterConfig& config, const std::string& path,
                                    long id, fit::Role role);

// --status: asks node `node` (a `what`, "storage node") for its status text with
// `opcode`, speaking as node `as` (or, when as < 0, the first processor node), and
// prints the text on stdout. Returns main()'s exit status; dies when the node does not
// answer.
int print_status(const fit::ClusterConfig& config, fit::NodeId node, long as, uint16_t opcode,
                 const char* what);

// Raises this process's RLIMIT_NOFILE soft limit to its hard limit (every connection,
// and for lego-stord every open file of every client, is a descriptor) and returns the
// limit now in force.
uint64_t raise_fd_limit();

// Ignores SIGPIPE: a vanished peer is an error on its socket, not a death.
void ignore_sigpipe();
// ignore_sigpipe(), and SIGTERM and SIGINT set stop_requested() and wake
// run_until_stopped() at once (the handler writes to a pipe it polls).
void install_stop_handlers();
bool stop_requested();
// Calls `tick` every `period` until stop_requested(); returns as soon as a stop signal
// arrives (after install_stop_handlers()), not at the end of the period.
void run_until_stopped(std::chrono::milliseconds period, const std::function<void()>& tick);

// Writes "ready\n" to fd and closes it (--ready-fd, for supervisors and tests); nothing
// when fd < 0.
void signal_ready(int fd);

// ---- A node daemon's main(), written once --------------------------------------------
//
// lego-memd and lego-stord (and any daemon that is one node of the cluster file) are a
// service on a fit::Node. run_node() is all of their main() but the service itself:
//   flags (node_flags() and the daemon's own) -> the cluster file -> --status (asks the
//   running node, prints its text, returns) -> the node must have the daemon's role ->
//   stop handlers, RLIMIT_NOFILE raised -> the service started -> fit::Node created,
//   served, started -> "PROGRAM: node N serving ..." on stderr -> with --metrics
//   ADDR:PORT, the Prometheus metrics server (lego/metrics.h) -> Service::started ->
//   --ready-fd -> the tick every kTickPeriod until SIGTERM/SIGINT -> "PROGRAM: node N
//   stopping" -> Service::stopping -> node stopped.
// Every failure dies as the helpers above do (kExitUsage for flags, the cluster file, a
// wrong role or what the service's start() says is a usage error).

// How often run_node() calls Service::tick: the daemons' lease expiry.
inline constexpr std::chrono::milliseconds kTickPeriod{200};

// A daemon's service, as its start() hands it to run_node(). The functions keep the
// service alive (capture a shared_ptr to it); run_node() destroys them after the FIT
// node, so no handler outlives what it serves.
struct Service {
  std::function<void(fit::Node&)> serve;  // registers its handlers; before the node starts
  std::function<void()> tick;             // every kTickPeriod on the main thread (or empty)
  std::string serving;                    // what it serves, for "serving WHAT at ..." (or "")
  std::string details;  // the start line's tail before the descriptors: ", lease 20000 ms"
  // Its counters for --metrics (lego/metrics.h): adds them to the exposition, whose
  // prefix is "lego_<daemon>_"; run_node adds the FIT node's after them. Called on the
  // metrics server's thread. Empty: FIT's counters only.
  std::function<void(metrics::Exposition&)> metrics;
  // Optional. `started` runs once the node serves, before --ready-fd is signalled (a
  // service that calls other nodes from threads of its own starts them here); `stopping`
  // runs after a stop signal, before the node stops (those threads end here: they must
  // not outlive the node).
  std::function<void(fit::Node&)> started;
  std::function<void()> stopping;
};

struct NodeDaemon {
  const char* program;      // "lego-memd": messages start with it
  const char* usage;        // --help text
  fit::Role role;           // the role its --node must have in the cluster file
  uint16_t status_opcode;   // what --status sends; the service must answer it
  std::vector<Flag> flags;  // its own, beside node_flags(..., true)
  // Starts the service once the flags, the cluster file and the node's role are checked,
  // stop handlers installed and the descriptor limit raised. Dies (daemon::die) when it
  // cannot.
  std::function<Service(const fit::NodeConfig& me)> start;
};

// The whole main() of a node daemon: returns main()'s exit status (0 after a stop
// signal, or --status's), or dies.
int run_node(int argc, char** argv, const NodeDaemon& d);

}  // namespace lego::daemon
