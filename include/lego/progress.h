// Progress of long work (a benchmark's runs, a re-replication) on a terminal and in logs.
//
// On a terminal (isatty(fd)) a Progress keeps one line that it redraws in place ("\r",
// then erase to the end of the line): "lego-bench: [3/12] random, 25% local, zram_swap
// 41% 0:12". Anywhere else (a CI log, a pipe, a file) it writes plain lines that are
// never redrawn: one when a step starts, and within a long step at most one every
// kPlainInterval, so a log shows that the work goes on without flooding it.
// note() prints a line of its own (a warning, a retry) without garbling the progress
// line; finish() (or the destructor) ends it.
//
// Costs: a line written at most every kTerminalInterval on a terminal; update() between
// redraws is a clock read and a compare. Writes go straight to `fd` with write(2) (no
// stdio buffering to interleave with the program's own output on stdout).
//
// Thread-safety: every method may be called from any thread (a mutex inside); lines of
// several threads never interleave.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace lego {

class Progress {
 public:
  static constexpr std::chrono::milliseconds kTerminalInterval{100};
  static constexpr std::chrono::seconds kPlainInterval{10};

  // `program` prefixes each line ("lego-bench"); `steps` is the number of steps step()
  // will be called for (0: unknown, then "[3]" instead of "[3/12]"); output goes to `fd`
  // (default stderr). Whether it is a terminal is decided here, once.
  explicit Progress(std::string program, uint64_t steps = 0, int fd = 2);
  // finish().
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Starts the next step, named `label` ("random, 25% local, zram_swap"): a new plain
  // line, or the terminal line redrawn at once.
  void step(const std::string& label);
  // Within the current step: `done` of `total` units (bytes, accesses); total 0 when
  // unknown. Redraws the terminal line at most every kTerminalInterval; plain output
  // gets a line at most every kPlainInterval.
  void update(uint64_t done, uint64_t total);
  // A message of its own line ("zram_swap: OOM-killed, running again"), prefixed with the
  // program; on a terminal the progress line is redrawn under it.
  void note(const std::string& message);
  // Ends the terminal line (a newline after it); nothing for plain output. Later calls
  // start a new line. Idempotent.
  void finish();

  // True when output goes to a terminal (lines are redrawn).
  bool on_terminal() const { return terminal_; }

 private:
  // The current line's text, without "\r" or "\n". Caller holds mu_.
  std::string line_locked() const;
  void write_all(const std::string& text);  // whole text, retried on EINTR/short writes

  const std::string program_;
  const uint64_t steps_;
  const int fd_;
  const bool terminal_;

  std::mutex mu_;
  uint64_t step_ = 0;                                   // guarded by mu_
  std::string label_;                                   // guarded by mu_
  uint64_t done_ = 0, total_ = 0;                       // guarded by mu_
  std::chrono::steady_clock::time_point step_start_{};  // guarded by mu_
  std::chrono::steady_clock::time_point last_write_{};  // guarded by mu_
  bool line_open_ = false;  // a terminal line is drawn and not ended; guarded by mu_
};

}  // namespace lego
