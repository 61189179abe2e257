// The one exception type native code raises; the bindings translate it into
// Python's ckpt._C.NativeError. It never crosses an extern "C" boundary.
#pragma once

#include <stdexcept>
#include <string>

namespace ckpt {

class NativeErrorCpp : public std::runtime_error {
 public:
  explicit NativeErrorCpp(const std::string& what) : std::runtime_error(what) {}
};

// "<call>: <what> failed: <strerror(errno)>"
std::string errno_message(const std::string& call, const std::string& what, int err);

}  // namespace ckpt
