// Progress of long work (include/lego/progress.h). Guards: output that is not a terminal
// (a pipe, as in a CI log) gets plain lines -- no "\r", no escape sequences, one line per
// step, and update() called in a tight loop adds no line within kPlainInterval -- and a
// terminal (a pseudo-terminal here) gets one line redrawn in place with "\r" that
// finish() ends with a newline; note() lines stand on their own in both.
#include "lego/progress.h"

#include <fcntl.h>
#include <pty.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <string>
#include <thread>

namespace {

// Everything readable on fd now (fd non-blocking).
std::string read_now(int fd) {
  std::string s;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) s.append(buf, static_cast<size_t>(n));
  return s;
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("progress on a pipe: plain lines, one per step, never redrawn") {
  int p[2];
  REQUIRE(pipe(p) == 0);
  REQUIRE(fcntl(p[0], F_SETFL, O_NONBLOCK) == 0);
  {
    lego::Progress progress("bench", 2, p[1]);
    CHECK_FALSE(progress.on_terminal());
    progress.step("random, tcp");
    for (uint64_t i = 0; i < 100000; ++i) progress.update(i, 100000);
    progress.note("OOM-killed, running again");
    progress.step("scan, shm");
    progress.finish();
  }
  close(p[1]);
  const std::string out = read_now(p[0]);
  close(p[0]);
  CHECK(out ==
        "bench: [1/2] random, tcp\n"
        "bench: OOM-killed, running again\n"
        "bench: [2/2] scan, shm\n");
  CHECK(out.find('\r') == std::string::npos);
  CHECK(out.find('\033') == std::string::npos);
}

TEST_CASE("progress on a terminal: one line redrawn with \\r, ended by finish") {
  int master = -1, slave = -1;
  REQUIRE(openpty(&master, &slave, nullptr, nullptr, nullptr) == 0);
  REQUIRE(fcntl(master, F_SETFL, O_NONBLOCK) == 0);
  {
    lego::Progress progress("bench", 0, slave);
    CHECK(progress.on_terminal());
    progress.step("random");
    progress.update(1, 4);
    std::this_thread::sleep_for(lego::Progress::kTerminalInterval * 2);
    progress.update(3, 4);
    progress.note("a warning");
    progress.finish();
    progress.finish();  // idempotent
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const std::string out = read_now(master);
  close(slave);
  close(master);
  INFO(out);
  // step, the update after the interval, the note (which redraws after it), finish.
  CHECK(count(out, "\r\033[K") == 4);
  CHECK(out.find("bench: [1] random") != std::string::npos);
  CHECK(out.find(" 75%") != std::string::npos);
  CHECK(out.find("bench: a warning") != std::string::npos);
  // The update within the interval was not drawn; finish ended the line.
  CHECK(out.find(" 25%") == std::string::npos);
  CHECK(out.back() == '\n');
}
