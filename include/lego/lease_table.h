// LeaseTable: the objects a daemon holds for clients that must keep talking to it --
// lego-memd's address spaces, lego-stord's sessions -- each named by an id and a 128-bit
// random secret, and freed when nothing was heard from its client for a lease.
//
// A client gets (id, secret) from add() and presents both with every request; find()
// answers only when both match (the secret is compared in constant time), so one client
// can never reach another's object by guessing ids. Every find() renews the lease. The
// lease runs on a fit::LeaseClock that follows the daemon's fit::Node: time in which the
// node's server threads could not serve does not count against anyone (see fit.h).
//
// What a refusal means is the caller's to say (which errno, naming what): find() and
// remove() only answer nullptr.
//
// Thread-safety: every method may be called from any thread. One mutex guards the table;
// find() holds it for one hash lookup and a 16-byte compare. The objects are shared_ptrs:
// one found by a request stays alive while the request uses it, even if it expires or is
// removed meanwhile, so objects that can be closed under a request carry their own lock
// and "closed" flag. for_each() calls its function with the table's mutex held: take the
// object's own lock inside it (lock order: the table, then the object), never the other
// way round.
//
// Needs libsodium, initialised (sodium_init()) before the first add().
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lego/fit.h"

namespace lego {

inline constexpr size_t kLeaseSecretBytes = 16;

// Fills `secret` with random bytes (libsodium's randombytes_buf).
void lease_new_secret(std::span<uint8_t, kLeaseSecretBytes> secret);
// True when a and b are equal, in time independent of where they differ.
bool lease_secrets_equal(std::span<const uint8_t, kLeaseSecretBytes> a,
                         std::span<const uint8_t, kLeaseSecretBytes> b);

template <typename T>
class LeaseTable {
 public:
  struct Key {
    uint64_t id = 0;
    uint8_t secret[kLeaseSecretBytes] = {};
  };

  LeaseTable() = default;
  LeaseTable(const LeaseTable&) = delete;
  LeaseTable& operator=(const LeaseTable&) = delete;

  // Leases follow `node`'s serving time from now on (nullptr: plain steady time). The
  // node must outlive later expire() calls.
  void follow(const fit::Node* node) { clock_.follow(node); }

  // Adds `value` under a fresh id (1, 2, ...) and secret, its lease starting now. Returns
  // nullopt, adding nothing, when the table already holds `max_entries`.
  std::optional<Key> add(std::shared_ptr<T> value,
                         size_t max_entries = std::numeric_limits<size_t>::max()) {
    Entry e;
    lease_new_secret(e.secret);
    e.value = std::move(value);
    e.last_heard = clock_.now();
    Key key;
    memcpy(key.secret, e.secret, sizeof(key.secret));
    std::lock_guard<std::mutex> g(mu_);
    if (entries_.size() >= max_entries) return std::nullopt;
    key.id = next_id_++;
    entries_.emplace(key.id, std::move(e));
    return key;
  }

  // The object named by id and secret, its lease renewed; nullptr when there is none or
  // the secret is not its own.
  std::shared_ptr<T> find(uint64_t id, std::span<const uint8_t, kLeaseSecretBytes> secret) {
    const int64_t now = clock_.now();
    std::lock_guard<std::mutex> g(mu_);
    Entry* e = match(id, secret);
    if (e == nullptr) return nullptr;
    e->last_heard = now;
    return e->value;
  }

  // Takes the object named by id and secret out of the table and returns it; nullptr
  // (nothing removed) as find() would.
  std::shared_ptr<T> remove(uint64_t id, std::span<const uint8_t, kLeaseSecretBytes> secret) {
    std::lock_guard<std::mutex> g(mu_);
    Entry* e = match(id, secret);
    if (e == nullptr) return nullptr;
    std::shared_ptr<T> v = std::move(e->value);
    entries_.erase(id);
    return v;
  }

  // Advances the lease clock, takes every object not heard from for `lease` out of the
  // table and returns them with their ids, for the caller to free (outside the table's
  // lock). O(entries); the daemons call it every 200 ms.
  std::vector<std::pair<uint64_t, std::shared_ptr<T>>> expire(std::chrono::nanoseconds lease) {
    const int64_t cutoff = clock_.advance() - lease.count();
    std::vector<std::pair<uint64_t, std::shared_ptr<T>>> out;
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->second.last_heard < cutoff) {
        out.emplace_back(it->first, std::move(it->second.value));
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
    return out;
  }

  size_t size() const {
    std::lock_guard<std::mutex> g(mu_);
    return entries_.size();
  }

  // Calls fn(id, T&) for every object, with the table's mutex held (see the top).
  template <typename Fn>
  void for_each(Fn&& fn) const {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [id, e] : entries_) fn(id, *e.value);
  }
  // Calls fn(id, const std::shared_ptr<T>&) for every object, with the table's mutex held:
  // for a caller that keeps some of them to use after the table's lock is let go.
  template <typename Fn>
  void for_each_shared(Fn&& fn) const {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [id, e] : entries_) fn(id, e.value);
  }

 private:
  struct Entry {
    std::shared_ptr<T> value;
    uint8_t secret[kLeaseSecretBytes] = {};
    int64_t last_heard = 0;  // clock_ time of the last add() or find()
  };

  Entry* match(uint64_t id, std::span<const uint8_t, kLeaseSecretBytes> secret) {
    auto it = entries_.find(id);
    if (it == entries_.end() || !lease_secrets_equal(it->second.secret, secret)) return nullptr;
    return &it->second;
  }

  fit::LeaseClock clock_;
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Entry> entries_;  // guarded by mu_
  uint64_t next_id_ = 1;                         // guarded by mu_
};

}  // namespace lego
