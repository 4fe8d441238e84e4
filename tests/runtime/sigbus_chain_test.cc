// Description: the process-wide SIGBUS handler must pass on every SIGBUS that is not a miss
// in an ExCache region: to the handler installed before it, or to the default action (the
// process dies of SIGBUS, not of a hang or a silent return). Each case runs in a forked
// child so that it starts with no ExCache and no handler installed (the parent never
// creates one).
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <functional>
#include <string>

#include "lego/excache.h"
#include "tests/runtime/map_backend.h"

namespace {

// A SIGBUS outside any region: touch a file mapping past the end of its (empty) file.
char* make_bus_error_page() {
  char path[] = "/tmp/excache_sigbus_XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) _exit(90);
  unlink(path);
  void* p = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) _exit(91);
  return static_cast<char*>(p);
}

// Runs `body` in a child; returns its wait status.
int in_child(const std::function<void()>& body) {
  pid_t pid = fork();
  if (pid == 0) {
    body();
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

std::unique_ptr<lego::ExCache> make_cache(lego::LineBackend* backend) {
  lego::ExCacheOptions options;
  options.capacity_bytes = 64 * lego::kExCacheLineBytes;
  options.region_bytes = 256 * lego::kExCacheLineBytes;
  auto created = lego::ExCache::create(options, backend);
  if (!created.is_ok()) _exit(92);
  return std::move(created.value());
}

sigjmp_buf g_jump;
volatile sig_atomic_t g_previous_calls = 0;
volatile sig_atomic_t g_previous_code = 0;

void previous_handler(int, siginfo_t* info, void*) {
  g_previous_calls = g_previous_calls + 1;
  g_previous_code = info->si_code;
  if (info->si_code == BUS_ADRERR) siglongjmp(g_jump, 1);  // a real fault: skip the access
}

}  // namespace

TEST_CASE("foreign SIGBUS goes to the previously installed handler", "[excache][sigbus]") {
  int status = in_child([] {
    struct sigaction sa = {};
    sa.sa_sigaction = previous_handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGBUS, &sa, nullptr);
    lego::testing::MapBackend backend(512);
    auto cache = make_cache(&backend);
    char* region = static_cast<char*>(cache->region_base());

    region[0] = 1;  // a miss: ours, the previous handler must not see it
    if (g_previous_calls != 0) _exit(10);
    raise(SIGBUS);  // sent, not a fault
    if (g_previous_calls != 1 || g_previous_code != SI_TKILL) _exit(11);
    char* bad = make_bus_error_page();
    if (sigsetjmp(g_jump, 1) == 0) {
      bad[0] = 1;  // a real fault outside the region
      _exit(12);
    }
    if (g_previous_calls != 2) _exit(13);
    for (int i = 0; i < 256; ++i) region[i * 4096] = static_cast<char>(i);  // still served
    for (int i = 0; i < 256; ++i) {
      if (region[i * 4096] != static_cast<char>(i)) _exit(14);
    }
  });
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("foreign SIGBUS with no previous handler kills the process", "[excache][sigbus]") {
  // The child's stderr, to see it say why it dies.
  char log_path[] = "/tmp/excache_sigbus_log_XXXXXX";
  const int log_fd = mkstemp(log_path);
  REQUIRE(log_fd >= 0);
  unlink(log_path);
  int status = in_child([log_fd] {
    dup2(log_fd, STDERR_FILENO);
    lego::testing::MapBackend backend(512);
    auto cache = make_cache(&backend);
    static_cast<char*>(cache->region_base())[0] = 1;
    make_bus_error_page()[0] = 1;
    _exit(20);  // survived: the fault was swallowed
  });
#if defined(__SANITIZE_ADDRESS__)
  // ASan's own SIGBUS handler was the previous one: it reports and exits non-zero.
  CHECK(((WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS) ||
         (WIFEXITED(status) && WEXITSTATUS(status) != 0 && WEXITSTATUS(status) != 20)));
#else
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGBUS);
  // Not a silent death: the message names the address that was not a miss.
  char log[512] = {};
  CHECK(pread(log_fd, log, sizeof log - 1, 0) > 0);
  CHECK(std::string(log).find("SIGBUS that is not a lego miss (si_code 2) at 0x") !=
        std::string::npos);
#endif
  close(log_fd);
}
