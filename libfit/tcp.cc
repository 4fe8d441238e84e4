// The tcp provider (tcp.h): its client connections, its one-sided ops, and the provider
// object (listening, answers, rejections). The server's threads are in tcp_server.cc.
#include "libfit/tcp.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace lego::fit::transport {

std::unique_ptr<Transport> make_tcp(const Context& ctx) {
  return std::make_unique<tcp::TcpTransport>(ctx);
}

namespace tcp {

using wire::FrameHeader;
using wire::Kind;

ssize_t recv_some(int fd, StreamBuffer& in) {
  if (in.head > 0) {
    memmove(in.data, in.data + in.head, in.len - in.head);
    in.len -= in.head;
    in.head = 0;
  }
  if (in.len == in.cap) return 0;  // full: frame what we have first
  ssize_t n = recv(fd, in.data + in.len, in.cap - in.len, MSG_DONTWAIT);
  if (n > 0) {
    in.len += static_cast<size_t>(n);
    return n;
  }
  if (n == 0) return -ECONNRESET;
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
  return -errno;
}

namespace {

// Writes all of [head, head+head_len) and then [payload, payload+payload_len) to a
// non-blocking socket with sendmsg (a frame's header and payload need not be copied into
// one buffer), waiting for room up to timeout_ms. Returns 0 or an errno. Clients only: a
// server never waits for a peer (Thread::flush).
int send_all2(int fd, const std::byte* head, size_t head_len, const std::byte* payload,
              size_t payload_len, int timeout_ms) {
  size_t done = 0;
  const size_t len = head_len + payload_len;
  while (done < len) {
    iovec iov[2];
    int n_iov = 0;
    if (done < head_len) {
      iov[n_iov++] = {const_cast<std::byte*>(head + done), head_len - done};
      if (payload_len > 0) iov[n_iov++] = {const_cast<std::byte*>(payload), payload_len};
    } else {
      iov[n_iov++] = {const_cast<std::byte*>(payload + (done - head_len)), len - done};
    }
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = static_cast<size_t>(n_iov);
    ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      if (poll(&p, 1, timeout_ms) == 0) return ETIMEDOUT;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      return n == 0 ? ECONNRESET : errno;
    }
  }
  return 0;
}

// The length of the complete frame at the front of `in`, 0 if it is not all there yet, or
// -EPROTO when the stream cannot be a FIT stream (a length no frame may have).
ssize_t next_frame(const StreamBuffer& in, size_t max_payload) {
  if (in.buffered() < kHeader) return 0;
  uint32_t length;
  memcpy(&length, in.front() + offsetof(FrameHeader, length), sizeof(length));
  if (length > max_payload) return -EPROTO;
  size_t total = kHeader + length;
  return in.buffered() >= total ? static_cast<ssize_t>(total) : 0;
}

// A client connection: a non-blocking socket, headers sent from the slots (payloads from
// the caller's buffer), replies framed and delivered straight from the stream buffer.
class TcpConnection final : public ClientConnection {
 public:
  explicit TcpConnection(const Context& ctx) : ctx_(ctx) {}
  ~TcpConnection() override {
    if (fd_ >= 0) ::close(fd_);
  }

  Status open(const NodeConfig& peer, ClientHost* host) override;
  Status send(int slot, Kind kind, uint16_t opcode, std::span<const std::byte> payload, uint64_t id,
              bool caller_keeps, bool* in_flight) override;
  Status poll(int wait_ms) override;
  Status rma(bool write, uint64_t key, uint64_t addr, std::byte* local, size_t len) override;

 private:
  std::string peer_name() const { return "node " + std::to_string(peer_); }

  Context ctx_;
  ClientHost* host_ = nullptr;
  NodeId peer_ = 0;
  int fd_ = -1;
  SlotBuffers bufs_;
  MappedBytes in_storage_;
  StreamBuffer in_;
  IdlePoll idle_;
};

Status TcpConnection::open(const NodeConfig& peer, ClientHost* host) {
  host_ = host;
  peer_ = peer.id;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* ai = nullptr;
  std::string port = std::to_string(peer.port);
  int gr = getaddrinfo(peer.address.c_str(), port.c_str(), &hints, &ai);
  if (gr != 0) return Status(EHOSTUNREACH, std::string("cannot resolve: ") + gai_strerror(gr));
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(ai);
    return Status::from_errno(errno, "socket");
  }
  int r = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
  freeaddrinfo(ai);
  if (r != 0 && errno != EINPROGRESS) {
    int e = errno;
    ::close(fd);
    return Status::from_errno(e, "connect");
  }
  pollfd p{fd, POLLOUT, 0};
  if (r != 0 && ::poll(&p, 1, static_cast<int>(ctx_.config->timeout.count())) != 1) {
    ::close(fd);
    return Status(ETIMEDOUT, "no answer to connect");
  }
  int err = 0;
  socklen_t len = sizeof(err);
  getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    ::close(fd);
    return Status::from_errno(err, "connect");
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  fd_ = fd;
  const size_t max = ctx_.config->max_message_bytes;
  LEGO_RETURN_IF_ERROR(bufs_.init(max, max, 2 * kWindow));
  LEGO_RETURN_IF_ERROR(in_storage_.map(2 * bufs_.slot_bytes));
  in_.reset(in_storage_.data, in_storage_.size);
  return Status();
}

Status TcpConnection::send(int slot, Kind kind, uint16_t opcode, std::span<const std::byte> payload,
                           uint64_t id, bool caller_keeps, bool* in_flight) {
  (void)caller_keeps;  // the payload always goes from where it is
  std::byte* buf = bufs_.slot(slot);
  wire::encode_header({buf, kHeader}, kind, opcode, static_cast<uint32_t>(payload.size()), 0, id,
                      ctx_.self->id);
  // The payload goes from the caller's buffer: a send does not return before it is in the
  // socket.
  *in_flight = false;
  int e = send_all2(fd_, buf, kHeader, payload.data(), payload.size(),
                    static_cast<int>(ctx_.config->timeout.count()));
  if (e != 0) {
    return Status(e == ETIMEDOUT ? ETIMEDOUT : ECONNRESET,
                  ctx_.who + ": sending to " + peer_name() + ": " + strerror(e));
  }
  return Status();
}

Status TcpConnection::poll(int wait_ms) {
  if (!host_->failure().is_ok()) return host_->failure();
  if (ctx_.blocking && wait_ms > 0) {
    pollfd p{fd_, POLLIN, 0};
    ::poll(&p, 1, wait_ms);
  }
  ssize_t n = recv_some(fd_, in_);
  if (n < 0) {
    Status st(ECONNRESET, ctx_.who + ": " + peer_name() + " went away (" +
                              strerror(static_cast<int>(-n)) + ")");
    host_->fail(st);
    return st;
  }
  for (;;) {
    ssize_t total = next_frame(in_, ctx_.config->max_message_bytes);
    if (total < 0) {
      Status st(EPROTO,
                ctx_.who + ": " + peer_name() + " sent a frame longer than max_message_bytes");
      host_->fail(st);
      return st;
    }
    if (total == 0) break;
    // Decoded straight from the stream buffer (the reply is copied once, into the caller's
    // buffer), then consumed.
    const bool ok = host_->on_frame(RawFrame{{in_.data + in_.head, static_cast<size_t>(total)}});
    in_.head += static_cast<size_t>(total);
    if (!ok) return host_->failure();
  }
  if (n > 0) {
    idle_.busy();
  } else if (n == 0 && !ctx_.blocking && idle_.should_sleep(kSpinNs)) {
    // Spun past the budget: sleep until bytes arrive (or 1 ms, to re-check deadlines).
    pollfd p{fd_, POLLIN, 0};
    ::poll(&p, 1, 1);
  } else if (n == 0 && ctx_.blocking) {
    nap_if_needed(ctx_.blocking, true, idle_, kSpinNs);
  }
  return Status();
}

// One-sided ops over sockets: requests served by the owner's libfit server thread.
Status TcpConnection::rma(bool write, uint64_t key, uint64_t addr, std::byte* local, size_t len) {
  return served_rma::call(ctx_, host_, write, key, addr, local, len);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The provider object

TcpTransport::TcpTransport(const Context& ctx) : ctx_(ctx) {}

std::unique_ptr<ClientConnection> TcpTransport::new_connection() {
  return std::make_unique<TcpConnection>(ctx_);
}

Result<int> TcpTransport::listen(ServerHost* host) {
  const NodeConfig& self = *ctx_.self;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* ai = nullptr;
  std::string port = std::to_string(self.port);
  int gr = getaddrinfo(self.address.c_str(), port.c_str(), &hints, &ai);
  if (gr != 0) {
    return Status(EADDRNOTAVAIL,
                  ctx_.who + ": cannot resolve " + self.address + ": " + gai_strerror(gr));
  }
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  int br = fd < 0 ? -1 : bind(fd, ai->ai_addr, ai->ai_addrlen);
  freeaddrinfo(ai);
  // A deep accept queue: under a burst of connections (or a peer opening thousands) the
  // kernel drops SYNs once it is full, and a dropped client retries only after 1 s.
  if (br != 0 || ::listen(fd, SOMAXCONN) != 0) {
    int e = errno;
    if (fd >= 0) ::close(fd);
    return Status::from_errno(e, ctx_.who + ": listen on " + self.address + ":" + port);
  }
  int threads = std::max(1, self.server_threads);
  for (int i = 0; i < threads; i++) {
    auto t = std::make_unique<Thread>();
    t->t = this;
    t->host = host;
    t->index = i;
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (t->epfd < 0) {
      ::close(fd);
      return Status::from_errno(errno, ctx_.who + ": epoll_create1");
    }
    threads_.push_back(std::move(t));
  }
  Thread& t0 = *threads_[0];
  t0.listen_fd = fd;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;  // the listening socket
  epoll_ctl(t0.epfd, EPOLL_CTL_ADD, fd, &ev);
  listening_ = true;
  return threads;
}

void TcpTransport::run(int thread) {
  threads_[thread]->run();
}

void TcpTransport::close_server() {
  listening_ = false;
  while (!threads_.empty()) threads_.pop_back();  // last first
}

void TcpTransport::send(Delivery& d0, Kind kind, uint16_t opcode, uint32_t length, int32_t status,
                        uint64_t id) {
  auto& d = static_cast<TcpDelivery&>(d0);
  Conn& conn = *d.conn;
  std::byte* buf = conn.bufs->slot(0);
  wire::encode_header({buf, kHeader}, kind, opcode, length, status, id, ctx_.self->id);
  // Written from the send slot where it lies; what the socket does not take now waits
  // there (Thread::flush), and the connection reads nothing more until it is out.
  ctx_.counters->bytes_sent.fetch_add(length, std::memory_order_relaxed);
  conn.out = buf;
  conn.out_len = kHeader + length;
  conn.out_done = 0;
  conn.out_since_ns = d.thread->now_ns;
  d.thread->flush(conn);
}

void TcpTransport::reject(Delivery& d0, const Status& st, uint16_t opcode, uint64_t id) {
  auto& d = static_cast<TcpDelivery&>(d0);
  d.thread->refuse(*d.conn, st, opcode, id, CloseWhy::kRejected);
}

const Handler* TcpTransport::internal_handler(uint16_t opcode) const {
  return regions_.handler(opcode);
}

Result<std::unique_ptr<Registration>> TcpTransport::register_memory(void* data, size_t size,
                                                                    bool remote_write,
                                                                    RemoteRegion* remote) {
  if (!listening_) {
    return Status(EINVAL, ctx_.who + ": start() the node before registering memory");
  }
  return regions_.add(data, size, remote_write, remote);
}

}  // namespace tcp
}  // namespace lego::fit::transport
