// Which programs lego's runtime can reach (runtime/launcher/program_check.h).
#include "runtime/launcher/program_check.h"

#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace lego::launch {

std::string resolve_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* env = getenv("PATH");
  const std::string path = env != nullptr ? env : "/bin:/usr/bin";
  size_t start = 0;
  for (;;) {
    const size_t end = path.find(':', start);
    std::string dir = path.substr(start, end == std::string::npos ? end : end - start);
    if (dir.empty()) dir = ".";
    const std::string candidate = dir + "/" + name;
    struct stat st;
    if (stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
    if (end == std::string::npos) return "";
    start = end + 1;
  }
}

std::string local_only_reason(const std::string& path, int depth) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  unsigned char head[256] = {};
  const ssize_t n = pread(fd, head, sizeof head - 1, 0);
  std::string why;
  if (n >= 2 && head[0] == '#' && head[1] == '!') {
    // "#! /path/interp arg": the kernel runs the interpreter (nested up to 4 times).
    const char* p = reinterpret_cast<const char*>(head) + 2;
    while (*p == ' ' || *p == '\t') p++;
    const char* e = p;
    while (*e != '\0' && *e != ' ' && *e != '\t' && *e != '\n') e++;
    const std::string interp(p, e);
    if (!interp.empty() && depth < 4) {
      const std::string inner = local_only_reason(interp, depth + 1);
      if (!inner.empty()) why = "runs on " + interp + ", which " + inner;
    }
  } else if (n >= static_cast<ssize_t>(sizeof(Elf64_Ehdr)) && memcmp(head, ELFMAG, SELFMAG) == 0) {
    if (head[EI_CLASS] == ELFCLASS32) {
      why = "is a 32-bit program (lego's runtime is 64-bit)";
    } else if (head[EI_CLASS] == ELFCLASS64) {
      Elf64_Ehdr eh;
      memcpy(&eh, head, sizeof eh);
      bool interp = false;
      for (unsigned i = 0; i < eh.e_phnum && eh.e_phentsize >= sizeof(Elf64_Phdr); i++) {
        Elf64_Phdr ph;
        if (pread(fd, &ph, sizeof ph, static_cast<off_t>(eh.e_phoff + i * eh.e_phentsize)) !=
            sizeof ph) {
          break;
        }
        interp |= ph.p_type == PT_INTERP;
      }
      struct stat st;
      const bool have_stat = fstat(fd, &st) == 0;
      if (eh.e_type != ET_EXEC && eh.e_type != ET_DYN) {
        // Not a program: exec says so.
      } else if (!interp) {
        why = "is statically linked";
      } else if (have_stat && (st.st_mode & S_ISUID) && st.st_uid != geteuid()) {
        why = "is set-user-ID (the loader ignores LD_PRELOAD for it)";
      } else if (have_stat && (st.st_mode & S_ISGID) && st.st_gid != getegid()) {
        why = "is set-group-ID (the loader ignores LD_PRELOAD for it)";
      } else if (geteuid() != 0 && fgetxattr(fd, "security.capability", nullptr, 0) > 0) {
        why = "has file capabilities (the loader ignores LD_PRELOAD for it)";
      }
    }
  }
  close(fd);
  return why;
}

}  // namespace lego::launch
