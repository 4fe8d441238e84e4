// The shm doorbell (libfit/doorbell.h): a sleeping server wakes on a ring, not on its
// timeout; a ring with nobody asleep costs no wake; a client finds no bell where there is
// none or where the file is not a bell; a server replaces a stale bell and removes its own.
#include "libfit/doorbell.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

using lego::fit::transport::Doorbell;
using Clock = std::chrono::steady_clock;

namespace {

std::string unique_address(const char* what) {
  return std::string("doorbell-test/") + what + "/" + std::to_string(getpid());
}

// A server's bell at a test-unique address and a client's handle on it.
struct BellPair {
  std::unique_ptr<Doorbell> server, client;
};
BellPair open_pair(const char* what) {
  const std::string address = unique_address(what);
  auto server = Doorbell::create(address, 7);
  REQUIRE(server.is_ok());
  auto client = Doorbell::open(address, 7);
  REQUIRE(client != nullptr);
  return {std::move(server.value()), std::move(client)};
}

bool exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

}  // namespace

TEST_CASE("a sleeping server wakes on a ring, long before its timeout", "[doorbell]") {
  auto [server, client] = open_pair("wake");

  Doorbell& bell = *server;
  bell.arm();
  std::thread ringer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    client->ring();
  });
  const auto start = Clock::now();
  bell.wait(/*timeout_ms=*/20'000);
  const auto slept = Clock::now() - start;
  ringer.join();
  CHECK_FALSE(bell.armed());
  // Woken by the ring (~20 ms), not by the timeout (20 s); generous for a loaded host.
  CHECK(slept < std::chrono::seconds(10));
}

TEST_CASE("a ring between arm() and wait() is not lost", "[doorbell]") {
  auto [server, client] = open_pair("early");
  Doorbell& bell = *server;
  bell.arm();
  client->ring();  // as if the request landed just after the server's last poll
  const auto start = Clock::now();
  bell.wait(/*timeout_ms=*/20'000);
  CHECK(Clock::now() - start < std::chrono::seconds(10));
}

TEST_CASE("without a ring the server sleeps out its timeout", "[doorbell]") {
  auto [server, client] = open_pair("timeout");
  Doorbell& bell = *server;
  client->ring();  // nobody asleep: no effect on a later sleep
  bell.arm();
  const auto start = Clock::now();
  bell.wait(/*timeout_ms=*/200);
  CHECK(Clock::now() - start >= std::chrono::milliseconds(150));
  bell.arm();
  bell.disarm();  // work came after all: the next ring wakes nobody
  CHECK_FALSE(bell.armed());
}

TEST_CASE("a client finds no bell where none is, or where the file is not one", "[doorbell]") {
  CHECK(Doorbell::open(unique_address("none"), 7) == nullptr);

  const std::string address = unique_address("short");
  const std::string path = Doorbell::path_for(address, 7);
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  REQUIRE(fd >= 0);
  close(fd);  // an empty file: mapping it and ringing would fault
  CHECK(Doorbell::open(address, 7) == nullptr);
  unlink(path.c_str());
}

TEST_CASE("a server replaces a stale bell and removes its own", "[doorbell]") {
  const std::string address = unique_address("stale");
  const std::string path = Doorbell::path_for(address, 7);
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  REQUIRE(fd >= 0);
  close(fd);  // left by a server that died
  {
    auto server = Doorbell::create(address, 7);
    REQUIRE(server.is_ok());
    CHECK(Doorbell::open(address, 7) != nullptr);
  }
  CHECK_FALSE(exists(path));
}

TEST_CASE("addresses with any characters, and ports, get distinct, valid names", "[doorbell]") {
  const std::string a = Doorbell::path_for("node/a b", 7);
  const std::string b = Doorbell::path_for("node/a_b", 7);
  CHECK(a != b);
  // Nodes of one host may share an address: the port tells their bells apart.
  CHECK(Doorbell::path_for("node", 7) != Doorbell::path_for("node", 8));
  CHECK(a.rfind("/dev/shm/", 0) == 0);
  CHECK(a.find('/', 9) == std::string::npos);
  CHECK(a.find(' ') == std::string::npos);
}
