// Prometheus metrics of lego's daemons: the text exposition format, and a tiny HTTP/1.1
// server that answers GET /metrics with it (lego-memd, lego-stord --metrics ADDR:PORT).
//
// Exposition: counters and gauges with HELP and TYPE lines, named PREFIX + NAME
// ("lego_memd_" + "fetches"), in the order added. Names come from the daemons' counter
// lists (LEGO_MEMORY_NODE_COUNTERS, LEGO_STORAGE_NODE_COUNTERS, LEGO_FIT_COUNTERS): the
// HELP text is each counter's comment there.
//
// MetricsServer: one thread of its own (never a FIT server thread), polling its listening
// socket and at most kMaxClients connections, all non-blocking. Bounded like FIT's server:
// a request must arrive whole within kRequestDeadline and within kMaxRequestBytes, and
// its answer be taken within kResponseDeadline, or the connection is closed; when
// kMaxClients are open the oldest is closed for a new one. So a slow, silent or hostile
// scraper (slow loris, a huge request, one that never reads) costs at most one slot for a
// few seconds and cannot stall the others or grow the daemon's memory. Only GET /metrics
// is served (404 for other paths, 405 for other methods, 400 for what is not HTTP); every
// answer closes the connection.
//
// Thread-safety: Exposition is a plain value (one thread). The server calls `render` on
// its own thread, one scrape at a time: render must be safe to call from there (the
// daemons' stats() are). start() and the destructor from one thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "lego/status.h"

namespace lego::metrics {

class Exposition {
 public:
  // "lego_memd_": prepended to every name added.
  explicit Exposition(std::string prefix) : prefix_(std::move(prefix)) {}
  // One metric: `type` "counter" or "gauge"; `help` one line (escaped here).
  void add(const char* name, const char* type, const char* help, uint64_t value);
  // Another prefix for what is added next ("lego_memd_fit_").
  void set_prefix(std::string prefix) { prefix_ = std::move(prefix); }
  const std::string& text() const { return text_; }

 private:
  std::string prefix_;
  std::string text_;
};

class MetricsServer {
 public:
  static constexpr int kMaxClients = 16;
  static constexpr size_t kMaxRequestBytes = 8192;
  static constexpr std::chrono::milliseconds kRequestDeadline{5000};
  static constexpr std::chrono::milliseconds kResponseDeadline{5000};

  // Listens on `address` ("127.0.0.1:9101", "[::1]:9101", "0.0.0.0:9101"; port 0 picks
  // one: port() says which) and starts the thread. EINVAL names a malformed address;
  // EADDRINUSE and other bind errors name the address.
  static Result<std::unique_ptr<MetricsServer>> start(const std::string& address,
                                                      std::function<std::string()> render);
  // EINVAL (naming it) when `address` is not one start() accepts: for a daemon to refuse
  // a bad --metrics before it starts anything.
  static Status check_address(const std::string& address);
  // Stops the thread and closes every connection.
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  uint16_t port() const { return port_; }

 private:
  MetricsServer() = default;
  struct Loop;
  std::unique_ptr<Loop> loop_;
  uint16_t port_ = 0;
};

}  // namespace lego::metrics
