// A persistent pool of worker threads for the codec: parallel_for over a
// fixed number of pieces, the calling thread working too. Workers are
// started on first need and then sleep on a condition variable, so a call
// costs a wake-up, not a thread creation. One call uses the pool at a time;
// a concurrent caller runs its pieces on its own thread instead of waiting.
#pragma once

#include <cstddef>
#include <functional>

namespace ckpt_ec {

// Runs fn(i) for every i in [0, n) on up to `threads` threads (the caller's
// included) and returns when all are done. fn must not throw.
void parallel_for(size_t n, int threads, const std::function<void(size_t)>& fn);

}  // namespace ckpt_ec
