#include "libfit/bench/floors.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

namespace lego::bench {
namespace {

using Clock = std::chrono::steady_clock;

bool enter_ns(const std::string& ns) {
  if (ns.empty()) return true;
  std::string path = "/var/run/netns/" + ns;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = setns(fd, CLONE_NEWNET) == 0;
  close(fd);
  return ok;
}

// Sends or receives exactly n bytes, waiting as `wait` says (the floors' own clients and
// servers: spinning on EAGAIN unless told otherwise is the point of a floor).
bool wait_io(int fd, char* buf, size_t n, bool send_side, Wait wait) {
  const int flags = wait == Wait::kBlock ? 0 : MSG_DONTWAIT;
  size_t done = 0;
  while (done < n) {
    ssize_t r = send_side ? send(fd, buf + done, n - done, flags | MSG_NOSIGNAL)
                          : recv(fd, buf + done, n - done, flags);
    if (r > 0) {
      done += static_cast<size_t>(r);
    } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      return false;
    } else if (wait == Wait::kYield && errno != EINTR) {
      sched_yield();
    }
  }
  return true;
}

// An shm endpoint libfabric names itself (fi_pingpong's) lives in /dev/shm as
// "<pid>:<n>:<n>", 16 MiB, and is unlinked only when the process closes it: one killed
// leaves it behind. Removes what `pid` left.
void remove_shm_regions_of(pid_t pid) {
  const std::string prefix = std::to_string(pid) + ":";
  DIR* d = opendir("/dev/shm");
  if (d == nullptr) return;
  while (dirent* e = readdir(d)) {
    if (strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) unlinkat(dirfd(d), e->d_name, 0);
  }
  closedir(d);
}

// Kills and reaps a child that may still run, and removes the shm regions it left if it
// was a killed fi_pingpong.
void kill_and_reap(pid_t pid) {
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  remove_shm_regions_of(pid);
}

// Reaps the child when it goes out of scope, killing it if it still runs.
struct Child {
  pid_t pid = -1;
  ~Child() {
    if (pid > 0) kill_and_reap(pid);
  }
};

}  // namespace

namespace {

// A connected, busy-pollable TCP pair: `serve(socket)` runs in a forked child (in
// server_ns when not empty) on the accepted connection; the caller gets the client end.
struct TcpPair {
  Child child;
  int fd = -1;
  ~TcpPair() {
    if (fd >= 0) close(fd);
  }
};

Result<sockaddr_in> ipv4(const std::string& server_addr, uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, server_addr.c_str(), &addr.sin_addr) != 1) {
    return Status(EINVAL, "tcp floor: '" + server_addr + "' is not an IPv4 address");
  }
  return addr;
}

// "ADDRESS:PORT" of addr, for errors.
std::string endpoint(const sockaddr_in& addr) {
  char where[INET_ADDRSTRLEN] = "?";
  inet_ntop(AF_INET, &addr.sin_addr, where, sizeof where);
  return std::string(where) + ":" + std::to_string(ntohs(addr.sin_port));
}

// Forks the server into `child` (in server_ns when not empty), listening on addr with
// `backlog`; `serve(listening socket)` runs there. Returns once it listens. A port of 0 is
// any free one: addr gets the port the server bound. The server dies with its parent, so
// that a lego-bench killed before its clients connected leaves no server waiting in accept.
template <typename Serve>
Status start_server(Child& child, const std::string& server_ns, sockaddr_in& addr, int backlog,
                    Serve serve) {
  int ready[2];
  if (pipe2(ready, O_CLOEXEC) != 0) return Status::from_errno(errno, "pipe");
  const pid_t parent = getpid();
  child.pid = fork();
  if (child.pid < 0) return Status::from_errno(errno, "fork");
  if (child.pid == 0) {
    close(ready[0]);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(13);  // the parent died before the line above
    if (!enter_ns(server_ns)) _exit(10);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in bound{};
    socklen_t len = sizeof bound;
    if (bind(ls, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(ls, backlog) != 0 ||
        getsockname(ls, reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
      _exit(11);
    }
    (void)!write(ready[1], &bound.sin_port, sizeof bound.sin_port);
    serve(ls);
    _exit(0);
  }
  close(ready[1]);
  in_port_t port = 0;
  ssize_t got;
  while ((got = read(ready[0], &port, sizeof port)) < 0 && errno == EINTR) {
  }
  close(ready[0]);
  if (got != sizeof port) {
    return Status(EIO, "tcp floor: the server could not listen on " + endpoint(addr) +
                           (server_ns.empty() ? "" : " in " + server_ns));
  }
  addr.sin_port = port;
  return Status();
}

// A server's accepted connection or a client's connected one: no Nagle delay.
int no_delay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

Result<int> connect_to(const sockaddr_in& addr) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::from_errno(errno, "socket");
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    close(fd);
    return Status::from_errno(err, "tcp floor: connect to " + endpoint(addr));
  }
  return no_delay(fd);
}

template <typename Serve>
Status connect_pair(TcpPair& pair, const std::string& server_ns, const std::string& server_addr,
                    uint16_t port, Serve serve) {
  auto addr = ipv4(server_addr, port);
  if (!addr) return addr.status();
  LEGO_RETURN_IF_ERROR(start_server(pair.child, server_ns, addr.value(), 1, [&](int ls) {
    int s = accept(ls, nullptr, nullptr);
    if (s < 0) _exit(12);
    serve(no_delay(s));
  }));
  auto fd = connect_to(addr.value());
  if (!fd) return fd.status();
  pair.fd = fd.value();
  return Status();
}

}  // namespace

Result<double> tcp_busypoll_rtt_us(const std::string& server_ns, const std::string& server_addr,
                                   uint16_t port, size_t message_bytes, int iterations) {
  return tcp_busypoll_rtt_us(server_ns, server_addr, port, message_bytes, message_bytes,
                             iterations);
}

Result<double> tcp_busypoll_rtt_us(const std::string& server_ns, const std::string& server_addr,
                                   uint16_t port, size_t request_bytes, size_t reply_bytes,
                                   int iterations) {
  TcpPair pair;
  // The server: one connection, answer each request until it closes.
  Status st = connect_pair(pair, server_ns, server_addr, port, [=](int s) {
    std::vector<char> buf(std::max(request_bytes, reply_bytes));
    while (wait_io(s, buf.data(), request_bytes, false, Wait::kSpin) &&
           wait_io(s, buf.data(), reply_bytes, true, Wait::kSpin)) {
    }
  });
  if (!st) return st;
  std::vector<char> buf(std::max(request_bytes, reply_bytes), 'x');
  auto one_trip = [&] {
    return round_trip(pair.fd, buf.data(), request_bytes, reply_bytes, Wait::kSpin);
  };
  for (int i = 0; i < std::max(100, iterations / 10); i++) {
    if (!one_trip()) return Status(ECONNRESET, "tcp floor: the server went away");
  }
  std::vector<double> batches;
  int per_batch = std::max(10, iterations / 20);
  for (int done = 0; done < iterations; done += per_batch) {
    auto t0 = Clock::now();
    for (int i = 0; i < per_batch; i++) {
      if (!one_trip()) return Status(ECONNRESET, "tcp floor: the server went away");
    }
    batches.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() /
                      per_batch);
  }
  std::sort(batches.begin(), batches.end());
  return batches[batches.size() / 2];
}

const char* wait_name(Wait wait) {
  switch (wait) {
    case Wait::kSpin:
      return "spin";
    case Wait::kYield:
      return "yield";
    case Wait::kBlock:
      return "block";
  }
  return "?";
}

namespace {

// The server's exit codes beyond 0 (start_server's 10, 11, 13 and accept's 12).
constexpr int kServerNoEpoll = 14;
constexpr int kServerReport = 15;

// The server's loop: one thread serving every connection until all of them closed, then
// the number of requests it answered written to `report` (8 bytes).
[[noreturn]] void serve_round_trips(int ls, int report, size_t request_bytes, size_t reply_bytes,
                                    int clients, Wait wait) {
  struct Conn {
    int fd;
    size_t have = 0;
  };
  std::vector<Conn> conns;
  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) _exit(kServerNoEpoll);
  for (int i = 0; i < clients; i++) {
    int s = accept(ls, nullptr, nullptr);
    if (s < 0) _exit(12);
    conns.push_back({no_delay(s)});
  }
  for (size_t i = 0; i < conns.size(); i++) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = i;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev) != 0) _exit(kServerNoEpoll);
  }
  uint64_t requests = 0;
  std::vector<char> in(request_bytes), out(reply_bytes, 'y');
  size_t open_conns = conns.size();
  // Reads what c has; answers each complete request. False once it closed.
  auto serve = [&](Conn& c) {
    for (;;) {
      ssize_t r = recv(c.fd, in.data() + c.have, request_bytes - c.have, MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        return false;
      }
      if (r < 0) return true;
      c.have += static_cast<size_t>(r);
      if (c.have == request_bytes) {
        c.have = 0;
        requests++;
        if (!wait_io(c.fd, out.data(), reply_bytes, true, wait)) return false;
      }
    }
  };
  // Serves c if still open; closes it (which also takes it out of the epoll set) once
  // its client closed.
  auto serve_or_close = [&](Conn& c) {
    if (c.fd < 0 || serve(c)) return;
    close(c.fd);
    c.fd = -1;
    open_conns--;
  };
  while (open_conns > 0) {
    if (wait != Wait::kBlock) {
      const uint64_t before = requests;
      for (Conn& c : conns) serve_or_close(c);
      if (requests == before && wait == Wait::kYield) sched_yield();  // a pass with none
      continue;
    }
    epoll_event evs[16];
    int n = epoll_wait(ep, evs, 16, -1);
    if (n < 0 && errno != EINTR) _exit(kServerNoEpoll);
    for (int k = 0; k < n; k++) serve_or_close(conns[evs[k].data.u64]);
  }
  _exit(write(report, &requests, sizeof requests) == sizeof requests ? 0 : kServerReport);
}

// What a server's exit status says, for errors.
std::string describe_server_exit(int status) {
  if (WIFSIGNALED(status)) return std::string("killed by ") + strsignal(WTERMSIG(status));
  switch (WEXITSTATUS(status)) {
    case 10:
      return "could not enter its network namespace";
    case 11:
      return "could not listen";
    case 12:
      return "accept failed";
    case 13:
      return "its parent died";
    case kServerNoEpoll:
      return "epoll failed";
    case kServerReport:
      return "could not report its answers";
    default:
      return "exit status " + std::to_string(WEXITSTATUS(status));
  }
}

}  // namespace

Result<std::unique_ptr<RoundTripServer>> RoundTripServer::start(const std::string& server_ns,
                                                                const std::string& server_addr,
                                                                uint16_t port, size_t request_bytes,
                                                                size_t reply_bytes, int clients,
                                                                Wait wait) {
  if (clients < 1 || request_bytes == 0 || reply_bytes == 0) {
    return Status(EINVAL, "tcp floor: no client or an empty message");
  }
  auto addr = ipv4(server_addr, port);
  if (!addr) return addr.status();
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) return Status::from_errno(errno, "tcp floor: pipe");
  Child child;
  Status started = start_server(child, server_ns, addr.value(), clients, [&](int ls) {
    close(report[0]);
    serve_round_trips(ls, report[1], request_bytes, reply_bytes, clients, wait);
  });
  close(report[1]);
  if (!started) {
    close(report[0]);
    return started;
  }
  std::unique_ptr<RoundTripServer> server(new RoundTripServer());
  server->pid_ = child.pid;
  child.pid = -1;  // the server reaps it from now on
  server->report_fd_ = report[0];
  server->addr_ = addr.value();
  server->request_bytes_ = request_bytes;
  server->reply_bytes_ = reply_bytes;
  return server;
}

RoundTripServer::~RoundTripServer() {
  if (report_fd_ >= 0) close(report_fd_);
  if (pid_ > 0) kill_and_reap(pid_);
}

Result<int> RoundTripServer::connect() const {
  return connect_to(addr_);
}

Result<RoundTripServer::Exit> RoundTripServer::wait_exit(int timeout_ms) {
  if (pid_ <= 0) return Status(ECHILD, "tcp floor: the server was already reaped");
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int status = 0;
    rusage usage{};
    const pid_t got = wait4(pid_, &status, WNOHANG, &usage);
    if (got == pid_) {
      pid_ = -1;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        return Status(EIO, "tcp floor: the server failed: " + describe_server_exit(status));
      }
      Exit e;
      ssize_t n;
      while ((n = read(report_fd_, &e.requests, sizeof e.requests)) < 0 && errno == EINTR) {
      }
      if (n != sizeof e.requests) return Status(EIO, "tcp floor: the server's report is missing");
      e.cpu_seconds = cpu_seconds(usage);
      return e;
    }
    if (got < 0 && errno != EINTR) return Status::from_errno(errno, "tcp floor: wait4");
    if (Clock::now() > deadline) {
      return Status(ETIMEDOUT, "tcp floor: the server did not exit within " +
                                   std::to_string(timeout_ms) + " ms of its clients closing");
    }
    usleep(1000);
  }
}

uint16_t RoundTripServer::port() const {
  return ntohs(addr_.sin_port);
}

double cpu_seconds(const rusage& usage) {
  auto secs = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + tv.tv_usec / 1e6; };
  return secs(usage.ru_utime) + secs(usage.ru_stime);
}

bool round_trip(int fd, char* buf, size_t request_bytes, size_t reply_bytes, Wait wait) {
  return round_trip(fd, buf, request_bytes, buf, reply_bytes, wait);
}

bool round_trip(int fd, const char* request, size_t request_bytes, char* reply, size_t reply_bytes,
                Wait wait) {
  // wait_io's send side only reads its buffer.
  return wait_io(fd, const_cast<char*>(request), request_bytes, true, wait) &&
         wait_io(fd, reply, reply_bytes, false, wait);
}

Result<double> tcp_concurrent_round_trips_per_s(const std::string& server_ns,
                                                const std::string& server_addr, uint16_t port,
                                                size_t request_bytes, size_t reply_bytes,
                                                int clients, int round_trips, Wait wait) {
  auto server = RoundTripServer::start(server_ns, server_addr, port, request_bytes, reply_bytes,
                                       clients, wait);
  if (!server) return server.status();
  std::vector<int> fds;
  for (int i = 0; i < clients; i++) {
    auto fd = server.value()->connect();
    if (!fd) {
      for (int open_fd : fds) close(open_fd);
      return fd.status();
    }
    fds.push_back(fd.value());
  }
  std::atomic<int> warm{0};
  std::atomic<bool> go{false}, failed{false};
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; i++) {
    threads.emplace_back([&, fd = fds[i]] {
      std::vector<char> buf(std::max(request_bytes, reply_bytes), 'x');
      auto trips = [&](int n) {
        for (int k = 0; k < n; k++) {
          if (!round_trip(fd, buf.data(), request_bytes, reply_bytes, wait)) return false;
        }
        return true;
      };
      bool ok = trips(std::max(100, round_trips / 10));
      warm.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      if (!ok || !trips(round_trips)) failed.store(true);
    });
  }
  while (warm.load() < clients) std::this_thread::yield();
  const auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (int fd : fds) close(fd);
  if (failed.load()) return Status(ECONNRESET, "tcp floor: the server went away");
  return double(clients) * round_trips / seconds;
}

Result<double> tcp_busypoll_stream_mb_s(const std::string& server_ns,
                                        const std::string& server_addr, uint16_t port,
                                        uint64_t total_bytes, size_t chunk_bytes,
                                        bool server_sends) {
  if (chunk_bytes == 0 || total_bytes == 0) return Status(EINVAL, "tcp floor: nothing to send");
  // Sender streams total_bytes in chunk_bytes sends; the receiver answers one byte when it
  // has them all, so the client's clock covers every byte arriving.
  auto pump = [total_bytes, chunk_bytes](int s, bool sending) {
    std::vector<char> buf(chunk_bytes, 'x');
    for (uint64_t done = 0; done < total_bytes;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(chunk_bytes, total_bytes - done));
      if (!wait_io(s, buf.data(), n, sending, Wait::kSpin)) return false;
      done += n;
    }
    return true;
  };
  TcpPair pair;
  Status st = connect_pair(pair, server_ns, server_addr, port, [&](int s) {
    char go = 0;
    if (server_sends) {
      if (wait_io(s, &go, 1, false, Wait::kSpin)) pump(s, true);
      wait_io(s, &go, 1, false, Wait::kSpin);  // the client's "all here"
    } else if (pump(s, false)) {
      wait_io(s, &go, 1, true, Wait::kSpin);
    }
  });
  if (!st) return st;
  char go = 'g';
  auto t0 = Clock::now();
  bool ok = server_sends ? wait_io(pair.fd, &go, 1, true, Wait::kSpin) && pump(pair.fd, false)
                         : pump(pair.fd, true) && wait_io(pair.fd, &go, 1, false, Wait::kSpin);
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (server_sends && ok) wait_io(pair.fd, &go, 1, true, Wait::kSpin);
  if (!ok) return Status(ECONNRESET, "tcp floor: the other end went away mid-stream");
  return static_cast<double>(total_bytes) / 1e6 / s;
}

Result<double> fi_pingpong_rtt_us(const std::string& provider, const std::string& endpoint,
                                  size_t message_bytes, int iterations,
                                  const std::string& server_ns, const std::string& server_addr,
                                  uint16_t control_port, const std::string& server_domain) {
  const char* binary = "/usr/bin/fi_pingpong";
  std::string size = std::to_string(message_bytes), iters = std::to_string(iterations);
  std::string port = std::to_string(control_port);
  Child server;
  server.pid = fork();
  if (server.pid < 0) return Status::from_errno(errno, "fork");
  if (server.pid == 0) {
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    if (!enter_ns(server_ns)) _exit(10);
    if (server_domain.empty()) {
      execl(binary, "fi_pingpong", "-p", provider.c_str(), "-e", endpoint.c_str(), "-S",
            size.c_str(), "-I", iters.c_str(), "-B", port.c_str(), nullptr);
    } else {
      execl(binary, "fi_pingpong", "-p", provider.c_str(), "-e", endpoint.c_str(), "-S",
            size.c_str(), "-I", iters.c_str(), "-B", port.c_str(), "-d", server_domain.c_str(),
            nullptr);
    }
    _exit(127);
  }
  auto deadline = Clock::now() + std::chrono::seconds(120);
  std::string last_output;
  // The server needs a moment to listen on its control port: retry the client.
  for (int attempt = 0; attempt < 50 && Clock::now() < deadline; attempt++) {
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) return Status::from_errno(errno, "pipe");
    Child client;
    client.pid = fork();
    if (client.pid < 0) return Status::from_errno(errno, "fork");
    if (client.pid == 0) {
      dup2(out[1], 1);
      dup2(out[1], 2);
      execl(binary, "fi_pingpong", "-p", provider.c_str(), "-e", endpoint.c_str(), "-S",
            size.c_str(), "-I", iters.c_str(), "-P", port.c_str(), server_addr.c_str(), nullptr);
      _exit(127);
    }
    close(out[1]);
    std::string text;
    char buf[4096];
    ssize_t n;
    while ((n = read(out[0], buf, sizeof(buf))) > 0) text.append(buf, static_cast<size_t>(n));
    close(out[0]);
    int status = 0;
    waitpid(client.pid, &status, 0);
    client.pid = -1;
    last_output = text;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      // The table's last line: bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec
      std::istringstream lines(text);
      std::string line, result;
      while (std::getline(lines, line)) {
        if (!line.empty() && isdigit(static_cast<unsigned char>(line[0]))) result = line;
      }
      std::istringstream fields(result);
      std::vector<std::string> f;
      std::string w;
      while (fields >> w) f.push_back(w);
      if (f.size() < 8) break;
      return 2.0 * strtod(f[6].c_str(), nullptr);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  while (!last_output.empty() && last_output.back() == '\n') last_output.pop_back();
  return Status(EIO, "fi_pingpong -p " + provider + " -e " + endpoint + " to " + server_addr +
                         " failed: " + last_output);
}

Result<std::string> rdma_device_of(const std::string& address) {
  // The interface that holds the address...
  std::string netdev;
  ifaddrs* all = nullptr;
  if (getifaddrs(&all) != 0) return Status::from_errno(errno, "getifaddrs");
  for (ifaddrs* a = all; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    char text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, text, sizeof(text));
    if (address == text) netdev = a->ifa_name;
  }
  freeifaddrs(all);
  if (netdev.empty()) return Status(ENODEV, "no interface of this host has address " + address);
  // ... and the RDMA device on that interface (port 1's first GID's netdev).
  DIR* d = opendir("/sys/class/infiniband");
  if (d == nullptr) return Status::from_errno(errno, "/sys/class/infiniband");
  std::string found;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(std::string("/sys/class/infiniband/") + e->d_name +
                    "/ports/1/gid_attrs/ndevs/0");
    std::string dev;
    if (std::getline(f, dev) && dev == netdev) found = e->d_name;
  }
  closedir(d);
  if (found.empty()) return Status(ENODEV, "no RDMA device on " + netdev + " (" + address + ")");
  return found;
}

}  // namespace lego::bench
