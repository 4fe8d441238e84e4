// lego::Status and lego::Result<T>: the one error convention of lego's C++ code.
//
// A Status is 0 (ok) or a positive errno value (ENOENT, ETIMEDOUT, ECONNRESET, ...) plus a
// message that says what failed and where: which node, which address, which opcode. Code
// never throws on fault-handling or progress threads; functions return a Status or a
// Result<T> and the caller decides. Status is cheap to move; an ok Status allocates nothing.
//
// Thread-safety: values; no shared state.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <variant>

namespace lego {

class [[nodiscard]] Status {
 public:
  Status() = default;  // ok
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return Status(); }
  // Builds an error from an errno value, appending strerror(code) to what failed.
  static Status from_errno(int code, const std::string& what) {
    return Status(code, what + ": " + std::strerror(code));
  }

  bool is_ok() const { return code_ == 0; }
  explicit operator bool() const { return is_ok(); }
  // errno-aligned: 0 when ok.
  int code() const { return code_; }
  const std::string& message() const { return message_; }
  // "message" or "ok", for logs and CLI errors.
  std::string to_string() const { return is_ok() ? "ok" : message_; }

  // Prefixes more context: Status(ENOENT, "x").with_context("reading node 3") gives
  // "reading node 3: x".
  Status with_context(const std::string& context) const {
    if (is_ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

 private:
  int code_ = 0;
  std::string message_;
};

// Either a T or an error Status (never an ok Status).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Status error) : v_(std::move(error)) {
    if (std::get<Status>(v_).is_ok()) v_ = Status(EINVAL, "Result built from an ok Status");
  }

  bool is_ok() const { return v_.index() == 0; }
  explicit operator bool() const { return is_ok(); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &std::get<T>(v_); }
  const T* operator->() const { return &std::get<T>(v_); }
  T& operator*() { return std::get<T>(v_); }
  // The error; ok Status when this holds a value.
  Status status() const { return is_ok() ? Status() : std::get<Status>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace lego

// Returns from the enclosing function if `expr` (a Status) is an error.
#define LEGO_RETURN_IF_ERROR(expr)                  \
  do {                                              \
    ::lego::Status lego_status_ = (expr);           \
    if (!lego_status_.is_ok()) return lego_status_; \
  } while (0)
