// The run directory and what lego-run cleans up through it (runtime/launch_contract.h
// describes the directory): the spaces the run's processes register there, closed on the
// memory node as each process ends; and the sweep of what killed runs left behind.
//
// Thread-safety: one thread per object; sweeper() forks.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <set>
#include <string>

#include "lego/fit.h"
#include "lego/status.h"
#include "runtime/launch_contract.h"

namespace lego::launch {

// The run directory, created before anything else of the run, so that everything the
// run leaves in /tmp is in it, and removed last.
class RunDir {
 public:
  ~RunDir() { remove(); }
  // Creates /tmp/lego-run-PID (mode 0700) and its report FIFO. An old directory of this
  // user under the name (an earlier process with this pid) is replaced; anyone else's
  // is an error.
  Status create();
  // Writes the run file (atomically: written aside, then renamed).
  Status write_info(const RunInfo& info);
  // Removes the directory with everything in it. Idempotent.
  void remove();

  const std::string& path() const { return path_; }
  // The report FIFO's read end (opened read-write: it never reads EOF), non-blocking.
  int report_fd() const { return report_fd_; }

 private:
  std::string path_;
  int report_fd_ = -1;
};

// The spaces registered in a run directory (space.PID.START.ID), closed on the memory
// node (mem::kClose) once their process is gone.
class SpaceRegistry {
 public:
  // `node` (may be null: then files are only removed) speaks for the run.
  SpaceRegistry(std::string dir, fit::Node* node) : dir_(std::move(dir)), node_(node) {}

  // Closes the spaces of processes that are gone, or (all) every space, and removes
  // their files. A file is claimed by renaming it first, so that two lego-runs sweeping
  // one dead run never close a space twice. After the memory node could not be reached,
  // leaves the rest for `backoff` (it, or the lease, frees them later).
  void reap(bool all, std::chrono::milliseconds backoff = std::chrono::milliseconds(5000));

  // From now on only removes files: the memory node is about to stop, and its spaces go
  // with it (closing them first would cost the round trips, and over shm lego-run's
  // first connection, for nothing).
  void stop_closing() { node_ = nullptr; }

  // Registered processes found alive by the last reap(false).
  int live() const { return live_; }
  // Spaces ever seen registered (--stats says when there were none).
  size_t registered() const { return registered_.size(); }
  // Spaces this registry closed.
  int closed() const { return closed_; }

 private:
  std::string dir_;
  fit::Node* node_;
  std::set<std::string> registered_;
  int live_ = 0, closed_ = 0;
  std::chrono::steady_clock::time_point retry_after_{};
};

// libfit names the shm endpoints of a process "lego-<pid>-<nonce>:<uid>:<n>" in /dev/shm
// and libfabric unlinks them when an endpoint is closed. The runtime never closes its node
// (a program's exit just ends the process), so such regions of processes that are gone
// are removed here: the run's own, and any earlier runs killed before they could clean up
// left behind. So are the doorbells and regions of private clusters' shm nodes that were
// killed ("lego-fit-bell-lego-run-<pid>-...", libfit/doorbell.h; "lego-run-<pid>:<port>")
// once their lego-run is gone.
void remove_shm_regions();

// Leftovers of lego-runs that were killed (kill -9 leaves no chance to clean up), found
// by the dead lego-run's pid in their names: run directories (this user's only; with
// --config the dead run's spaces are closed first, and a directory some process of the
// run still uses is kept for a later sweep), and as root the private cluster's network
// namespace and the host's end of its veth pair (private_cluster.h), lego-fs logs of
// older versions, and shm regions of dead processes. Anything of a live lego-run is left
// alone. Runs in a child process, started here, which the caller waits for: closing
// spaces joins another cluster, and libfabric's state must not stay in lego-run.
// Returns the child's pid (-1 if fork failed).
pid_t sweeper();

}  // namespace lego::launch
