// include/lego/progress.h: one redrawn line on a terminal, plain lines elsewhere.
#include "lego/progress.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>

namespace lego {

namespace {

// "1:05" or "1:02:03" for an elapsed time.
std::string clock_text(std::chrono::steady_clock::duration d) {
  const long s = static_cast<long>(std::chrono::duration_cast<std::chrono::seconds>(d).count());
  char buf[32];
  if (s >= 3600) {
    snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  } else {
    snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  }
  return buf;
}

}  // namespace

Progress::Progress(std::string program, uint64_t steps, int fd)
    : program_(std::move(program)), steps_(steps), fd_(fd), terminal_(isatty(fd) == 1) {}

Progress::~Progress() {
  finish();
}

std::string Progress::line_locked() const {
  std::string s = program_ + ": ";
  if (step_ > 0) {
    s += "[" + std::to_string(step_);
    if (steps_ > 0) s += "/" + std::to_string(steps_);
    s += "] ";
  }
  s += label_;
  if (total_ > 0) {
    char pct[16];
    snprintf(pct, sizeof pct, " %3.0f%%",
             100.0 * static_cast<double>(done_) / static_cast<double>(total_));
    s += pct;
  } else if (done_ > 0) {
    s += " " + std::to_string(done_);
  }
  s += " " + clock_text(std::chrono::steady_clock::now() - step_start_);
  return s;
}

void Progress::write_all(const std::string& text) {
  size_t off = 0;
  while (off < text.size()) {
    ssize_t n = write(fd_, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // output gone (a closed pipe): progress is not worth failing for
    off += static_cast<size_t>(n);
  }
}

void Progress::step(const std::string& label) {
  std::lock_guard<std::mutex> lock(mu_);
  ++step_;
  label_ = label;
  done_ = total_ = 0;
  step_start_ = last_write_ = std::chrono::steady_clock::now();
  if (terminal_) {
    write_all("\r\033[K" + line_locked());
    line_open_ = true;
  } else {
    // No elapsed time on the step's first line: it is always 0:00.
    std::string s = program_ + ": ";
    s += "[" + std::to_string(step_);
    if (steps_ > 0) s += "/" + std::to_string(steps_);
    write_all(s + "] " + label_ + "\n");
  }
}

void Progress::update(uint64_t done, uint64_t total) {
  std::lock_guard<std::mutex> lock(mu_);
  done_ = done;
  total_ = total;
  const auto now = std::chrono::steady_clock::now();
  const auto gap = terminal_ ? std::chrono::steady_clock::duration(kTerminalInterval)
                             : std::chrono::steady_clock::duration(kPlainInterval);
  if (now - last_write_ < gap) return;
  last_write_ = now;
  if (terminal_) {
    write_all("\r\033[K" + line_locked());
    line_open_ = true;
  } else {
    write_all(line_locked() + "\n");
  }
}

void Progress::note(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (terminal_ && line_open_) {
    write_all("\r\033[K" + program_ + ": " + message + "\n" + line_locked());
  } else {
    write_all(program_ + ": " + message + "\n");
  }
}

void Progress::finish() {
  std::lock_guard<std::mutex> lock(mu_);
  if (terminal_ && line_open_) {
    write_all("\r\033[K" + line_locked() + "\n");
    line_open_ = false;
  }
}

}  // namespace lego
