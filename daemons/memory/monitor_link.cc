// lego-memd's registration and heartbeats with lego-mond (monitor_link.h).
#include "daemons/memory/monitor_link.h"

#include <cstring>

#include "lego/daemon.h"
#include "lego/retry.h"

namespace lego::mem {
namespace {

using Clock = std::chrono::steady_clock;

mon::NodeUsage node_usage(const MemoryNode& memory) {
  const UsageReply u = memory.usage();
  return mon::NodeUsage{u.capacity_bytes, u.reserved_bytes, u.stored_bytes, u.requests,
                        u.generation};
}

}  // namespace

MonitorLink::MonitorLink(MemoryNode* memory, const fit::NodeConfig& monitor)
    : memory_(memory), monitor_(monitor) {}

MonitorLink::~MonitorLink() {
  stop();
}

std::string MonitorLink::monitor_name() const {
  return "monitor node " + std::to_string(monitor_.id) + " at " + monitor_.address + ":" +
         std::to_string(monitor_.port);
}

void MonitorLink::set_state(State s, const std::string& why) {
  State before;
  {
    std::lock_guard<std::mutex> g(mu_);
    before = state_;
    state_ = s;
    if (s == State::kRegistered) {
      last_answer_ = Clock::now();
    } else {
      why_ = why;
    }
  }
  // One message per change, not one per heartbeat.
  if (before == s) return;
  if (s == State::kRegistered && before != State::kStarting) {
    fprintf(stderr, "lego-memd: registered again with the %s\n", monitor_name().c_str());
  } else if (s == State::kUnreachable) {
    fprintf(stderr,
            "lego-memd: the %s does not answer (%s): serving anyway; registering when it "
            "does\n",
            monitor_name().c_str(), why.c_str());
  } else if (s == State::kRefused) {
    fprintf(stderr, "lego-memd: the %s refuses this node: %s; trying again\n",
            monitor_name().c_str(), why.c_str());
  }
}

Status MonitorLink::register_once() {
  mon::RegisterRequest r{};
  r.version = mon::kProtoVersion;
  r.incarnation = memory_->incarnation();
  // This node as the cluster file has it (fit::Node::create required it there).
  const fit::NodeConfig& me = *node_->config().find(node_->id());
  r.self.id = node_->id();
  r.self.port = me.port;
  r.self.provider = static_cast<uint8_t>(me.provider);
  strncpy(r.self.address, me.address.c_str(), sizeof(r.self.address) - 1);
  r.usage = node_usage(*memory_);
  mon::RegisterReply rep{};
  auto res = node_->send_reply(monitor_.id, mon::kRegister,
                               {reinterpret_cast<const std::byte*>(&r), sizeof(r)},
                               {reinterpret_cast<std::byte*>(&rep), sizeof(rep)});
  if (!res) return res.status();
  if (res.value() != sizeof(rep) || rep.version != mon::kProtoVersion) {
    return Status(EPROTO, "the monitor answered the registration with an unexpected layout");
  }
  registrations_++;
  return Status();
}

Status MonitorLink::heartbeat_once() {
  mon::NodeHeartbeat h{node_->id(), 0, memory_->incarnation(), node_usage(*memory_)};
  // A heartbeat never waits longer than the period: a slow monitor does not pile them up.
  auto res = node_->send_reply(monitor_.id, mon::kNodeHeartbeat,
                               {reinterpret_cast<const std::byte*>(&h), sizeof(h)}, {},
                               std::max(heartbeat_, std::chrono::milliseconds(100)));
  if (res) heartbeats_++;
  return res.status();
}

void MonitorLink::start(fit::Node& node) {
  node_ = &node;
  heartbeat_ = node.config().heartbeat;
  lost_after_ = node.config().lost_after;
  // EEXIST is retried for as long as the monitor may take to declare our old self lost.
  const auto give_up = Clock::now() + lost_after_ + heartbeat_;
  bool said_waiting = false;
  for (;;) {
    Status st = register_once();
    if (st) {
      set_state(State::kRegistered, "");
      fprintf(stderr, "lego-memd: registered with the %s\n", monitor_name().c_str());
      break;
    }
    if (st.code() == EACCES) {
      daemon::die("the " + monitor_name() + " refused this node's key: " + st.message() +
                  " (does this node's cluster file carry the cluster's key?)");
    }
    if (st.code() == EEXIST) {
      if (Clock::now() >= give_up) {
        daemon::die("node " + std::to_string(node.id()) +
                    " is already live in this cluster (another lego-memd --node " +
                    std::to_string(node.id()) + "?): " + st.message());
      }
      if (!said_waiting) {
        fprintf(stderr, "lego-memd: %s; waiting up to %lld ms for it to be declared lost\n",
                st.message().c_str(), static_cast<long long>((lost_after_ + heartbeat_).count()));
        said_waiting = true;
      }
      std::this_thread::sleep_for(heartbeat_);
      continue;
    }
    if (classify(st) == ErrorClass::kRefused || classify(st) == ErrorClass::kProtocol ||
        classify(st) == ErrorClass::kAnswer) {
      daemon::die("the " + monitor_name() + " refused the registration: " + st.message());
    }
    set_state(State::kUnreachable, st.message());
    break;
  }
  thread_ = std::thread([this] { loop(); });
}

void MonitorLink::loop() {
  while (!stop_.load()) {
    const auto wake = Clock::now() + heartbeat_;
    while (!stop_.load() && Clock::now() < wake) {
      std::this_thread::sleep_for(std::min(heartbeat_, std::chrono::milliseconds(20)));
    }
    if (stop_.load()) break;
    State now;
    {
      std::lock_guard<std::mutex> g(mu_);
      now = state_;
    }
    Status st = now == State::kRegistered ? heartbeat_once() : Status(ENOENT, "");
    if (st.code() == ENOENT) st = register_once();  // the monitor forgot us: register
    if (st) {
      set_state(State::kRegistered, "");
      continue;
    }
    failures_++;
    set_state(st.code() == EEXIST || st.code() == EACCES ? State::kRefused : State::kUnreachable,
              st.message());
  }
}

void MonitorLink::stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

std::string MonitorLink::status_text() const {
  std::lock_guard<std::mutex> g(mu_);
  const char* state = state_ == State::kRegistered    ? "registered"
                      : state_ == State::kUnreachable ? "unreachable"
                      : state_ == State::kRefused     ? "refused"
                                                      : "starting";
  std::string out = "monitor " + std::to_string(monitor_.id) + " " + monitor_.address + ":" +
                    std::to_string(monitor_.port) + " " + state;
  if (state_ == State::kRegistered) {
    out += " last_answer_ms " +
           std::to_string(
               std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_answer_)
                   .count());
  } else if (!why_.empty()) {
    out += " (" + why_ + ")";
  }
  out += "\nmonitor_registrations " + std::to_string(registrations_.load()) +
         "\nmonitor_heartbeats " + std::to_string(heartbeats_.load()) + "\nmonitor_failures " +
         std::to_string(failures_.load()) + "\n";
  return out;
}

}  // namespace lego::mem
