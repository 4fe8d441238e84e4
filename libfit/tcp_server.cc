// The tcp provider's server threads (tcp.h). Thread 0 accepts and runs every handshake;
// an authenticated connection gets full-size buffers and moves to its serving thread
// (round robin). No call here waits for a peer: sockets are non-blocking, a reply the
// socket cannot take waits in its send slot (want_write), and each turn serves at most
// kFramesPerTurn frames of a connection and kAcceptsPerTurn new connections.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "libfit/tcp.h"

namespace lego::fit::transport::tcp {

using wire::FrameHeader;
using wire::Kind;

Conn::~Conn() {
  if (fd >= 0) ::close(fd);
}

Thread::~Thread() {
  conns.clear();
  if (listen_fd >= 0) ::close(listen_fd);
  if (epfd >= 0) ::close(epfd);
}

void Thread::set_events(Conn& conn, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = &conn;
  epoll_ctl(epfd, EPOLL_CTL_MOD, conn.fd, &ev);
}

bool Thread::flush(Conn& conn) {
  while (conn.out_done < conn.out_len) {
    ssize_t n = ::send(conn.fd, conn.out + conn.out_done, conn.out_len - conn.out_done,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      conn.out_done += static_cast<size_t>(n);
      conn.out_since_ns = now_ns;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!conn.want_write) {
        conn.want_write = true;
        set_events(conn, EPOLLOUT);
      }
      return false;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      close(conn, CloseWhy::kPeer);
      return false;
    }
  }
  conn.out = nullptr;
  conn.out_len = conn.out_done = 0;
  if (conn.want_write) {
    conn.want_write = false;
    set_events(conn, EPOLLIN);
  }
  return true;
}

void Thread::drop_pending(Conn& conn) {
  if (!conn.in_pending_list) return;
  conn.in_pending_list = false;
  auto it = std::find(pending.begin(), pending.end(), &conn);
  if (it != pending.end()) pending.erase(it);
  if (conn.source != 0) {
    auto s = pending_by_source.find(conn.source);
    if (s != pending_by_source.end() && --s->second == 0) pending_by_source.erase(s);
  }
}

void Thread::close(Conn& conn, CloseWhy why) {
  if (conn.dead) return;
  conn.dead = true;
  any_closed = true;
  host->count_close(why);
  epoll_ctl(epfd, EPOLL_CTL_DEL, conn.fd, nullptr);
  drop_pending(conn);
  if (why != CloseWhy::kPeer && why != CloseWhy::kStalledReader) {
    // Read (and drop) what the peer sent that we will never look at: closing a socket with
    // unread bytes sends a reset, which can destroy the error frame just sent before the
    // peer reads it. Bounded: a peer that keeps sending gets its reset.
    std::byte sink[4096];
    for (int i = 0; i < 16 && recv(conn.fd, sink, sizeof sink, MSG_DONTWAIT) > 0; i++) {
    }
  }
  // The descriptor and buffers go when reap frees the connection, this turn.
}

void Thread::refuse(Conn& conn, const Status& st, uint16_t opcode, uint64_t id, CloseWhy why) {
  if (conn.dead) return;
  if (conn.out == nullptr) {
    // One try, without waiting: a peer that does not read will not read this either.
    std::byte* buf = conn.bufs->slot(0);
    size_t n = std::min(st.message().size(), conn.bufs->slot_bytes - kHeader);
    memcpy(buf + kHeader, st.message().data(), n);
    wire::encode_header({buf, kHeader}, Kind::kError, opcode, static_cast<uint32_t>(n), st.code(),
                        id, t->context().self->id);
    (void)!::send(conn.fd, buf, kHeader + n, MSG_NOSIGNAL | MSG_DONTWAIT);
  }
  close(conn, why);
}

// Over a cap on connections awaiting the handshake, the oldest goes, silent ones first
// (evict_first): of those from `source` (0: of all). An honest client says hello the
// moment it connects and is done a round trip later, so it is never the oldest silent
// connection; a peer sharing its address (the same host) that holds slots with silent
// connections loses those first. pending holds at least one match when called.
Conn* Thread::cap_victim(uint32_t source) {
  Conn* victim = nullptr;
  for (Conn* c : pending) {
    if (source != 0 && c->source != source) continue;
    if (victim == nullptr || evict_first(*c, *victim)) victim = c;
  }
  return victim;
}

void Thread::enforce_pending_caps(uint32_t source) {
  const std::string& who = host->who();
  auto same = pending_by_source.find(source);
  while (source != 0 && same != pending_by_source.end() && same->second > kMaxPendingPerSource) {
    refuse(*cap_victim(source),
           Status(EAGAIN, who + ": too many connections from one address "
                                "awaiting the handshake; this, the oldest, is closed"),
           0, 0, CloseWhy::kCap);
    same = pending_by_source.find(source);
  }
  while (pending.size() > kMaxPendingHandshakes) {
    refuse(*cap_victim(0),
           Status(EAGAIN, who + ": too many connections awaiting the handshake; "
                                "this, the oldest, is closed"),
           0, 0, CloseWhy::kCap);
  }
}

void Thread::accept() {
  Counters& counters = host->counters();
  for (int k = 0; k < kAcceptsPerTurn; k++) {
    sockaddr_in from{};
    socklen_t from_len = sizeof(from);
    int fd = accept4(listen_fd, reinterpret_cast<sockaddr*>(&from), &from_len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;    // all accepted
      if (errno == EINTR || errno == ECONNABORTED) continue;  // that one gave up
      const int err = errno;
      counters.accept_errors.fetch_add(1, std::memory_order_relaxed);
      // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), or worse: give
      // back the oldest handshake's descriptor, and stop polling the listener for a while
      // (the connection waiting in the backlog would report it ready again at once).
      if (!pending.empty()) {
        refuse(*cap_victim(0),
               Status(EAGAIN, host->who() + ": out of descriptors; the oldest connection "
                                            "awaiting the handshake is closed"),
               0, 0, CloseWhy::kCap);
      }
      epoll_event ev{};
      ev.events = 0;
      ev.data.ptr = nullptr;
      epoll_ctl(epfd, EPOLL_CTL_MOD, listen_fd, &ev);
      listen_paused_until = now_ns + kAcceptPauseNs;
      static std::atomic<int64_t> last_said{0};
      if (now_ns - last_said.load() > 10'000'000'000) {  // at most every 10 s
        last_said = now_ns;
        fprintf(stderr, "lego-fit: %s: accepting a connection failed: %s (%llu open)\n",
                host->who().c_str(), strerror(err),
                static_cast<unsigned long long>(counters.connections_open.load()));
      }
      return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto conn = std::make_unique<Conn>();
    conn->fd = fd;
    conn->bufs = std::make_unique<SlotBuffers>();
    const size_t hs_slot = (kHeader + kHandshakeSlotPayload + 63) & ~size_t{63};
    if (!conn->bufs->init(kHandshakeSlotPayload, 2 * hs_slot, 1)) {
      counters.accept_errors.fetch_add(1, std::memory_order_relaxed);
      continue;  // out of memory: the connection closes with `conn`
    }
    conn->in.reset(conn->bufs->rma(), conn->bufs->rma_bytes);
    const uint32_t source = from.sin_family == AF_INET ? from.sin_addr.s_addr : 0;
    conn->source = source;
    host->count_new_connection(*conn, now_ns);
    conn->in_pending_list = true;
    pending.push_back(conn.get());
    if (conn->source != 0) pending_by_source[conn->source]++;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = conn.get();
    {
      std::lock_guard<std::mutex> g(mu);
      epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
      conns.push_back(std::move(conn));
    }
    enforce_pending_caps(source);
  }
}

// A connection just welcomed: full-size buffers, and its serving thread. False when it
// was closed or now belongs to another thread (the caller must not touch it then).
bool Thread::upgrade(Conn& conn) {
  conn.just_authenticated = false;
  drop_pending(conn);
  if (conn.in.buffered() > 0) {
    refuse(conn, Status(EPROTO, host->who() + ": the client sent data before it was welcomed"), 0,
           0, CloseWhy::kRejected);
    return false;
  }
  const size_t max = host->config().max_message_bytes;
  const size_t slot = (kHeader + max + 63) & ~size_t{63};
  auto big = std::make_unique<SlotBuffers>();
  if (!big->init(max, 2 * slot, 1)) {
    fprintf(stderr, "lego-fit: %s: out of memory for node %u's connection buffers\n",
            host->who().c_str(), conn.client);
    close(conn, CloseWhy::kPeer);
    return false;
  }
  if (conn.out != nullptr) {  // the welcome, not all written yet
    const size_t left = conn.out_len - conn.out_done;
    memcpy(big->slot(0), conn.out + conn.out_done, left);
    conn.out = big->slot(0);
    conn.out_len = left;
    conn.out_done = 0;
  }
  conn.bufs = std::move(big);  // the handshake page goes back
  conn.in.reset(conn.bufs->rma(), conn.bufs->rma_bytes);

  Thread& owner = t->next_owner();
  if (&owner == this) return true;
  epoll_ctl(epfd, EPOLL_CTL_DEL, conn.fd, nullptr);
  std::unique_ptr<Conn> moving;
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = std::find_if(conns.begin(), conns.end(),
                           [&](const std::unique_ptr<Conn>& c) { return c.get() == &conn; });
    moving = std::move(*it);
    conns.erase(it);
  }
  backlog.erase(std::remove(backlog.begin(), backlog.end(), &conn), backlog.end());
  std::replace(backlog_now.begin(), backlog_now.end(), &conn, static_cast<Conn*>(nullptr));
  epoll_event ev{};
  ev.events = conn.want_write ? EPOLLOUT : EPOLLIN;
  ev.data.ptr = &conn;
  std::lock_guard<std::mutex> g(owner.mu);
  epoll_ctl(owner.epfd, EPOLL_CTL_ADD, conn.fd, &ev);
  owner.conns.push_back(std::move(moving));
  return false;
}

// Serves what the connection sent, at most kFramesPerTurn frames. Every header is judged
// as soon as it is in (ServerHost::check_header), before its payload is waited for.
void Thread::read(Conn& conn) {
  int served = 0;
  bool drained = false;  // the last read emptied the socket
  for (;;) {
    while (!conn.dead && conn.out == nullptr && conn.in.buffered() >= kHeader) {
      FrameHeader h;
      memcpy(&h, conn.in.front(), kHeader);
      TcpDelivery d;
      d.thread = this;
      d.conn = &conn;
      d.peer = &conn;
      d.answer = {conn.bufs->slot(0) + kHeader, conn.bufs->slot_bytes - kHeader};
      Status st = host->check_header(conn, h);
      if (!st) {
        host->reject(*t, d, st.with_context(host->who()), h.opcode, h.request_id);
        return;
      }
      const size_t total = kHeader + h.length;
      if (conn.in.buffered() < total) break;  // the rest is yet to come
      if (served == kFramesPerTurn) {
        backlog.push_back(&conn);  // more next turn, whether or not the socket has more
        return;
      }
      // Served where it lies in the stream buffer (no copy); the reply goes to send slot 0.
      host->serve(*t, d, RawFrame{{conn.in.data + conn.in.head, total}});
      conn.in.head += total;
      served++;
      if (conn.just_authenticated && !upgrade(conn)) return;
    }
    // A read that did not fill the buffer emptied the socket: asking again would only
    // return EAGAIN (a system call per request; epoll is level-triggered and reports
    // bytes that came since).
    if (conn.dead || conn.out != nullptr || drained) return;
    const size_t room = conn.in.cap - conn.in.buffered();
    ssize_t n = recv_some(conn.fd, conn.in);
    if (n < 0) {
      close(conn, CloseWhy::kPeer);
      return;
    }
    if (n == 0) return;
    drained = static_cast<size_t>(n) < room;
  }
}

void Thread::sweep() {
  // A reply its peer does not read for timeout_ms (an honest client reads its replies:
  // it has at most max_outstanding() requests out, and waits for them).
  const int64_t limit =
      std::chrono::duration_cast<std::chrono::nanoseconds>(host->config().timeout).count();
  std::lock_guard<std::mutex> g(mu);
  for (auto& c : conns) {
    if (!c->dead && c->out != nullptr && now_ns - c->out_since_ns > limit) {
      close(*c, CloseWhy::kStalledReader);
    }
  }
}

void Thread::reap() {
  any_closed = false;
  backlog.erase(
      std::remove_if(backlog.begin(), backlog.end(), [](Conn* c) { return c->dead.load(); }),
      backlog.end());
  std::vector<std::unique_ptr<Conn>> doomed;  // freed outside the lock
  std::lock_guard<std::mutex> g(mu);
  for (auto& c : conns) {
    if (c->dead) doomed.push_back(std::move(c));
  }
  conns.erase(std::remove(conns.begin(), conns.end(), nullptr), conns.end());
}

void Thread::run() {
  epoll_event evs[16];
  IdlePoll idle;
  bool sleep = false;
  const bool blocking = t->context().blocking;
  const int64_t deadline = host->handshake_deadline_ns();
  while (!host->stopping()) {
    const int wait = !backlog.empty() ? 0 : blocking || sleep ? kBlockingSliceMs : 0;
    int n = epoll_wait(epfd, evs, 16, wait);
    now_ns = host->turn(index);
    if (n <= 0 && backlog.empty()) {
      sleep = !blocking && idle.should_sleep(kServerSpinNs);
    } else {
      idle.busy();
      sleep = false;
    }
    for (int i = 0; i < n; i++) {
      if (evs[i].data.ptr == nullptr) {
        accept();
        continue;
      }
      auto* conn = static_cast<Conn*>(evs[i].data.ptr);
      if (conn->dead) continue;
      if (conn->out != nullptr && !flush(*conn)) continue;
      read(*conn);
    }
    backlog_now.swap(backlog);
    for (size_t i = 0; i < backlog_now.size(); i++) {  // read may null entries
      Conn* conn = backlog_now[i];
      if (conn != nullptr && !conn->dead && conn->out == nullptr) read(*conn);
    }
    backlog_now.clear();
    if (index == 0) {
      while (!pending.empty() && now_ns - pending.front()->accepted_ns > deadline) {
        refuse(*pending.front(),
               Status(ETIMEDOUT, host->who() + ": the connection handshake did not end within " +
                                     std::to_string(deadline / 1000000) + " ms"),
               0, 0, CloseWhy::kHandshakeTimeout);
      }
      if (listen_paused_until != 0 && now_ns >= listen_paused_until) {
        listen_paused_until = 0;
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.ptr = nullptr;
        epoll_ctl(epfd, EPOLL_CTL_MOD, listen_fd, &ev);
      }
    }
    if (now_ns >= next_sweep_ns) {
      sweep();
      next_sweep_ns = now_ns + 100'000'000;
    }
    if (any_closed) reap();
  }
}

}  // namespace lego::fit::transport::tcp
