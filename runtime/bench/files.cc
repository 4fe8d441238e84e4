// lego-bench's file workloads (runtime/bench/lego_bench.h): each on local disk, through
// the lego mount (lego-run --export), and as the bare TCP transport floor between two
// network namespaces.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <thread>

#include "lego/netns.h"
#include "lego/units.h"
#include "libfit/bench/floors.h"
#include "runtime/bench/lego_bench.h"

namespace lego::bench {

namespace {

bool is_throughput(const std::string& workload) {
  return workload.rfind("seq_", 0) == 0;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ",") + s;
  return out;
}

// The worker's "<workload> <figure>" lines, as rows of `system`.
void add_worker_rows(const FileOptions& fo, const std::string& system, const Outcome& o,
                     std::vector<FileRow>& rows) {
  std::map<std::string, double> got;
  std::istringstream in(o.text);
  std::string name;
  double v;
  while (in >> name >> v) got[name] = v;
  for (auto& w : fo.workloads) {
    FileRow r{w, system, false, 0, ""};
    if (got.count(w)) {
      r.ok = true;
      r.figure = got[w];
    } else {
      r.error = o.ok ? "no figure" : o.error;
    }
    rows.push_back(r);
  }
}

void run_file_worker(const FileOptions& fo, const std::string& system,
                     const std::vector<std::string>& prefix, const std::string& io_dir,
                     std::vector<FileRow>& rows) {
  std::vector<std::string> a = prefix;
  for (const std::string& x : {std::string("--file-worker"), io_dir, std::to_string(fo.size),
                               std::to_string(fo.rand_reads), join(fo.workloads)}) {
    a.push_back(x);
  }
  add_worker_rows(fo, system, run(a, "", nullptr), rows);
}

// The transport alone, between two network namespaces (the first plays the processor).
void run_tcp_floor(const FileOptions& fo, std::vector<FileRow>& rows) {
  const unsigned me = static_cast<unsigned>(getpid());
  netns::NetworkSpec spec;
  spec.namespaces = {"lgbf-" + std::to_string(me) + "-0", "lgbf-" + std::to_string(me) + "-1"};
  auto network = netns::Network::create(spec);
  if (!network) {
    for (auto& w : fo.workloads) {
      rows.push_back({w, "tcp_floor", false, 0, network.status().message()});
    }
    return;
  }
  const netns::Network& t = *network.value();
  uint16_t port = static_cast<uint16_t>(20000 + getpid() % 10000);
  std::thread th([&] {  // setns affects this thread only
    Status st = t.enter(0);
    for (auto& w : fo.workloads) {
      FileRow r{w, "tcp_floor", false, 0, ""};
      Result<double> v = st;
      if (!st) {
      } else if (w == "seq_write" || w == "seq_read") {
        v = tcp_busypoll_stream_mb_s(t.name(1), t.address(1), port++, fo.size, kFileChunk,
                                     w == "seq_read");
      } else {
        v = tcp_busypoll_rtt_us(t.name(1), t.address(1), port++, kPage,
                                static_cast<int>(fo.rand_reads));
      }
      if (v) {
        r.ok = true;
        r.figure = v.value();
      } else {
        r.error = v.status().message();
      }
      rows.push_back(r);
    }
  });
  th.join();
}

}  // namespace

std::vector<FileRow> run_files(const FileOptions& fo, const std::string& self,
                               const std::string& lego_run, Progress& progress) {
  std::vector<FileRow> rows;
  for (auto& s : fo.systems) {
    progress.step("files (" + join(fo.workloads) + "), " + s);
    if (s == "local" || s == "lego") {
      std::string tmpl = fo.dir + "/lego-bench-" + s + ".XXXXXX";
      if (mkdtemp(tmpl.data()) == nullptr) die("cannot create a directory under " + fo.dir);
      if (s == "local") {
        run_file_worker(fo, s, {self}, tmpl, rows);
      } else {
        run_file_worker(fo, s, {lego_run, "--export", tmpl, "--mount", "/lego", "--", self},
                        "/lego", rows);
      }
      unlink((tmpl + "/lego-bench.dat").c_str());
      rmdir(tmpl.c_str());
    } else if (s == "tcp_floor") {
      run_tcp_floor(fo, rows);
    } else {
      die("unknown file system '" + s + "' (local, lego, tcp_floor)");
    }
  }
  return rows;
}

void print_files(const FileOptions& fo, const std::vector<FileRow>& rows) {
  printf(
      "\nlego-bench: files, %s file, %ld random 4 KiB reads (seq_*: MB/s, higher is "
      "better; rand_read_4k: µs per read, lower is better)\n",
      format_size(fo.size).c_str(), fo.rand_reads);
  printf("%-13s %-10s %12s %-5s %11s %11s\n", "file_workload", "system", "figure", "unit",
         "lego/local", "lego/floor");
  for (auto& r : rows) {
    if (!r.ok) {
      printf("%-13s %-10s %12s  (%s)\n", r.workload.c_str(), r.system.c_str(), "failed",
             r.error.c_str());
      continue;
    }
    double local = 0, floor = 0;
    for (auto& q : rows) {
      if (q.workload != r.workload || !q.ok) continue;
      if (q.system == "local") local = q.figure;
      if (q.system == "tcp_floor") floor = q.figure;
    }
    char vl[32] = "", vf[32] = "";
    if (r.system == "lego" && local > 0) snprintf(vl, sizeof vl, "%.2fx", r.figure / local);
    if (r.system == "lego" && floor > 0) snprintf(vf, sizeof vf, "%.2fx", r.figure / floor);
    printf("%-13s %-10s %12.1f %-5s %11s %11s\n", r.workload.c_str(), r.system.c_str(), r.figure,
           is_throughput(r.workload) ? "MB/s" : "us", vl, vf);
  }
}

}  // namespace lego::bench
