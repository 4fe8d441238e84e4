// include/lego/metrics.h: the Prometheus text format, and the bounded GET /metrics server.
#include "lego/metrics.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

namespace lego::metrics {

void Exposition::add(const char* name, const char* type, const char* help, uint64_t value) {
  const std::string full = prefix_ + name;
  text_ += "# HELP " + full + " ";
  for (const char* p = help; *p; ++p) {  // the format's escapes for HELP
    if (*p == '\\') {
      text_ += "\\\\";
    } else if (*p == '\n') {
      text_ += "\\n";
    } else {
      text_ += *p;
    }
  }
  text_ += "\n# TYPE " + full + " " + type + "\n" + full + " " + std::to_string(value) + "\n";
}

namespace {

using Clock = std::chrono::steady_clock;

struct Client {
  int fd = -1;
  Clock::time_point deadline;
  std::string in;   // the request so far (at most kMaxRequestBytes)
  std::string out;  // the answer, once the request is whole
  size_t sent = 0;
  uint64_t serial = 0;  // accept order: the oldest is closed first
};

std::string answer(int code, const char* reason, const std::string& body,
                   const char* type = "text/plain; charset=utf-8") {
  return "HTTP/1.1 " + std::to_string(code) + " " + reason + "\r\nContent-Type: " + type +
         "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" +
         body;
}

// Parses "HOST:PORT" or "[HOST6]:PORT" into a socket address.
bool parse_address(const std::string& text, sockaddr_storage* ss, socklen_t* len) {
  std::string host, port;
  if (!text.empty() && text[0] == '[') {
    const size_t close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return false;
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string::npos) return false;
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos) {
    return false;
  }
  const long p = std::stol(port);
  if (p > 65535) return false;
  memset(ss, 0, sizeof *ss);
  auto* v4 = reinterpret_cast<sockaddr_in*>(ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(ss);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(p));
    *len = sizeof *v4;
    return true;
  }
  if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(p));
    *len = sizeof *v6;
    return true;
  }
  return false;
}

}  // namespace

struct MetricsServer::Loop {
  int listen_fd = -1;
  int wake_fd = -1;  // eventfd: the destructor's stop
  std::function<std::string()> render;
  std::vector<Client> clients;
  uint64_t next_serial = 0;
  std::thread thread;

  void close_client(size_t i) {
    close(clients[i].fd);
    clients.erase(clients.begin() + static_cast<long>(i));
  }

  // The request in c.in, if whole, becomes c.out. False when more is needed.
  bool respond_if_whole(Client& c) {
    const size_t end = c.in.find("\r\n\r\n");
    const size_t end_lf = c.in.find("\n\n");
    if (end == std::string::npos && end_lf == std::string::npos) {
      if (c.in.size() >= kMaxRequestBytes) {
        c.out = answer(431, "Request Header Fields Too Large", "request too large\n");
        return true;
      }
      return false;
    }
    const std::string line = c.in.substr(0, c.in.find_first_of("\r\n"));
    const size_t sp1 = line.find(' ');
    const size_t sp2 = sp1 == std::string::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp2 == std::string::npos || line.compare(sp2 + 1, 5, "HTTP/") != 0) {
      c.out = answer(400, "Bad Request", "not an HTTP request\n");
      return true;
    }
    const std::string method = line.substr(0, sp1), path = line.substr(sp1 + 1, sp2 - sp1 - 1);
    if (method != "GET" && method != "HEAD") {
      c.out = answer(405, "Method Not Allowed", "only GET /metrics\n");
    } else if (path != "/metrics" && path.rfind("/metrics?", 0) != 0) {
      c.out = answer(404, "Not Found", "only GET /metrics\n");
    } else {
      c.out = answer(200, "OK", render(), "text/plain; version=0.0.4; charset=utf-8");
      if (method == "HEAD") c.out.resize(c.out.find("\r\n\r\n") + 4);
    }
    return true;
  }

  void run() {
    std::vector<pollfd> fds;
    for (;;) {
      const auto now = Clock::now();
      // Deadlines first: a client past its deadline is closed, whatever it is doing.
      for (size_t i = clients.size(); i-- > 0;) {
        if (now >= clients[i].deadline) close_client(i);
      }
      int timeout_ms = -1;
      for (const Client& c : clients) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(c.deadline - now).count() + 1;
        if (timeout_ms < 0 || left < timeout_ms) timeout_ms = static_cast<int>(left);
      }
      fds.clear();
      fds.push_back({wake_fd, POLLIN, 0});
      fds.push_back({listen_fd, POLLIN, 0});
      for (const Client& c : clients) {
        fds.push_back({c.fd, static_cast<short>(c.out.empty() ? POLLIN : POLLOUT), 0});
      }
      if (poll(fds.data(), fds.size(), timeout_ms) < 0 && errno != EINTR) return;
      if (fds[0].revents) return;  // stop
      // Clients (before accepting, whose closing of the oldest would shift indices).
      for (size_t i = clients.size(); i-- > 0;) {
        const short ev = fds[i + 2].revents;
        if (ev == 0) continue;
        Client& c = clients[i];
        if (c.out.empty()) {
          char buf[4096];
          const size_t room = kMaxRequestBytes - c.in.size();
          const ssize_t n = recv(c.fd, buf, std::min(room, sizeof buf), 0);
          if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            close_client(i);
            continue;
          }
          if (n > 0) c.in.append(buf, static_cast<size_t>(n));
          if (respond_if_whole(c)) {
            c.in.clear();
            c.in.shrink_to_fit();
            c.deadline = Clock::now() + kResponseDeadline;
          }
        } else {
          const ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
          if (n < 0 && errno != EAGAIN && errno != EINTR) {
            close_client(i);
            continue;
          }
          if (n > 0) c.sent += static_cast<size_t>(n);
          if (c.sent == c.out.size()) {
            shutdown(c.fd, SHUT_WR);
            close_client(i);
          }
        }
      }
      if (fds[1].revents & POLLIN) {
        for (;;) {
          const int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (fd < 0) break;  // EAGAIN, or EMFILE: the listener is polled again next turn
          if (static_cast<int>(clients.size()) >= kMaxClients) {
            size_t oldest = 0;
            for (size_t i = 1; i < clients.size(); ++i) {
              if (clients[i].serial < clients[oldest].serial) oldest = i;
            }
            close_client(oldest);
          }
          Client c;
          c.fd = fd;
          c.deadline = Clock::now() + kRequestDeadline;
          c.serial = next_serial++;
          clients.push_back(std::move(c));
        }
      }
    }
  }
};

Status MetricsServer::check_address(const std::string& address) {
  sockaddr_storage ss;
  socklen_t len = 0;
  if (!parse_address(address, &ss, &len)) {
    return Status(EINVAL, "--metrics: '" + address +
                              "' is not ADDRESS:PORT (an IPv4 address, or an IPv6 one in [])");
  }
  return Status::ok();
}

Result<std::unique_ptr<MetricsServer>> MetricsServer::start(const std::string& address,
                                                            std::function<std::string()> render) {
  sockaddr_storage ss;
  socklen_t len = 0;
  if (Status st = check_address(address); !st) return st;
  parse_address(address, &ss, &len);
  const int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status(errno, std::string("metrics socket: ") + strerror(errno));
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || listen(fd, 64) != 0) {
    const int err = errno;
    close(fd);
    return Status(err, "metrics: cannot listen on " + address + ": " + strerror(err));
  }
  sockaddr_storage bound;
  socklen_t blen = sizeof bound;
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &blen);
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->port_ =
      ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  server->loop_ = std::make_unique<Loop>();
  Loop* loop = server->loop_.get();
  loop->listen_fd = fd;
  loop->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (loop->wake_fd < 0) {
    const int err = errno;
    close(fd);
    return Status(err, std::string("metrics eventfd: ") + strerror(err));
  }
  loop->render = std::move(render);
  loop->thread = std::thread([loop] { loop->run(); });
  return server;
}

MetricsServer::~MetricsServer() {
  if (!loop_) return;
  const uint64_t one = 1;
  (void)!write(loop_->wake_fd, &one, sizeof one);
  if (loop_->thread.joinable()) loop_->thread.join();
  for (Client& c : loop_->clients) close(c.fd);
  close(loop_->listen_fd);
  close(loop_->wake_fd);
}

}  // namespace lego::metrics
