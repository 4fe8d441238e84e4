// LeaseTable (include/lego/lease_table.h), the table of lego-memd's spaces and
// lego-stord's sessions. Guards: an object is reached only with its own id and secret
// (a guessed id, a wrong secret or one secret byte off gets nothing); ids are never
// reused; remove() takes an object out once; the bound refuses an add without adding;
// a lease renewed by find() keeps an object while an unheard one expires, and expire()
// hands back the expired objects with their ids; an object in use outlives its removal.
#include <sodium.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "lego/lease_table.h"

using namespace lego;
using std::chrono::milliseconds;

namespace {

struct Thing {
  std::string name;
};

using Table = LeaseTable<Thing>;

std::shared_ptr<Thing> thing(const char* name) {
  return std::make_shared<Thing>(Thing{name});
}

}  // namespace

TEST_CASE("lease table: an object is reached only with its own id and secret") {
  REQUIRE(sodium_init() >= 0);
  Table t;
  auto a = t.add(thing("a"));
  auto b = t.add(thing("b"));
  REQUIRE(a);
  REQUIRE(b);
  CHECK(a->id != b->id);
  CHECK(memcmp(a->secret, b->secret, sizeof(a->secret)) != 0);
  REQUIRE(t.find(a->id, a->secret));
  CHECK(t.find(a->id, a->secret)->name == "a");
  CHECK(t.find(b->id, b->secret)->name == "b");
  // b's secret does not open a, nor a guessed id.
  CHECK(t.find(a->id, b->secret) == nullptr);
  CHECK(t.find(b->id + 100, b->secret) == nullptr);
  Table::Key off = *a;
  off.secret[15] ^= 1;
  CHECK(t.find(off.id, off.secret) == nullptr);
  // remove() with a wrong secret takes nothing out.
  CHECK(t.remove(a->id, b->secret) == nullptr);
  CHECK(t.size() == 2);
}

TEST_CASE("lease table: remove takes an object out once, and ids are not reused") {
  REQUIRE(sodium_init() >= 0);
  Table t;
  auto a = t.add(thing("a"));
  std::shared_ptr<Thing> held = t.find(a->id, a->secret);
  auto gone = t.remove(a->id, a->secret);
  REQUIRE(gone);
  CHECK(gone == held);
  CHECK(t.remove(a->id, a->secret) == nullptr);
  CHECK(t.find(a->id, a->secret) == nullptr);
  CHECK(t.size() == 0);
  // What a request still holds stays valid after the removal.
  CHECK(held->name == "a");
  std::set<uint64_t> ids{a->id};
  for (int i = 0; i < 100; i++) CHECK(ids.insert(t.add(thing("n"))->id).second);
}

TEST_CASE("lease table: a full table refuses an add and adds nothing") {
  REQUIRE(sodium_init() >= 0);
  Table t;
  REQUIRE(t.add(thing("a"), 2));
  REQUIRE(t.add(thing("b"), 2));
  CHECK_FALSE(t.add(thing("c"), 2));
  CHECK(t.size() == 2);
  int seen = 0;
  t.for_each([&](uint64_t, Thing& x) {
    CHECK(x.name != "c");
    seen++;
  });
  CHECK(seen == 2);
}

TEST_CASE("lease table: an object heard from keeps its lease, an unheard one expires") {
  REQUIRE(sodium_init() >= 0);
  Table t;  // follows no node: plain steady time
  auto kept = t.add(thing("kept"));
  auto idle = t.add(thing("idle"));
  const auto lease = milliseconds(300);
  for (int i = 0; i < 5; i++) {
    std::this_thread::sleep_for(milliseconds(100));
    REQUIRE(t.find(kept->id, kept->secret));
    auto early = t.expire(lease);
    if (i < 1) CHECK(early.empty());  // 100 ms in: nothing is due yet
    for (auto& [id, v] : early) {
      CHECK(id == idle->id);
      CHECK(v->name == "idle");
    }
  }
  // 500 ms: idle is gone (it expired on one of the ticks above), kept is not.
  CHECK(t.find(idle->id, idle->secret) == nullptr);
  CHECK(t.find(kept->id, kept->secret) != nullptr);
  CHECK(t.size() == 1);
  std::this_thread::sleep_for(milliseconds(400));
  auto late = t.expire(lease);
  REQUIRE(late.size() == 1);
  CHECK(late[0].first == kept->id);
  CHECK(t.size() == 0);
}
