// See pool.h.
#include "pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace ckpt_ec {
namespace {

constexpr int kMaxWorkers = 255;

struct Job {
  const std::function<void(size_t)>* fn;
  size_t n;
  std::atomic<size_t> next{0};
  int helpers_wanted;
};

void work_on(Job* job) {
  for (;;) {
    size_t i = job->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job->n) return;
    (*job->fn)(i);
  }
}

class Pool {
 public:
  void run(size_t n, int threads, const std::function<void(size_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) {  // another caller has the pool: do our share alone
      for (size_t i = 0; i < n; i++) fn(i);
      return;
    }
    Job job;
    job.fn = &fn;
    job.n = n;
    job.helpers_wanted = threads - 1;
    {
      std::lock_guard<std::mutex> g(mu_);
      // A worker made now starts from the generation before this job's, so it joins it.
      while (int(workers_.size()) < threads - 1 && int(workers_.size()) < kMaxWorkers) {
        workers_.emplace_back([this, seen = gen_] { loop(seen); });
        workers_.back().detach();  // lives as long as the process
      }
      job_ = &job;
      joined_ = 0;
      gen_++;
    }
    cv_work_.notify_all();
    work_on(&job);
    std::unique_lock<std::mutex> g(mu_);
    job_ = nullptr;  // no late joiners
    cv_done_.wait(g, [this] { return active_ == 0; });
  }

 private:
  void loop(uint64_t seen) {
    std::unique_lock<std::mutex> g(mu_);
    for (;;) {
      cv_work_.wait(g, [&] { return gen_ != seen; });
      seen = gen_;
      Job* job = job_;
      if (!job || joined_ >= job->helpers_wanted) continue;
      joined_++;
      active_++;
      g.unlock();
      work_on(job);
      g.lock();
      if (--active_ == 0) cv_done_.notify_all();
    }
  }

  std::mutex run_mu_;  // held by the one call using the pool
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;
  uint64_t gen_ = 0;
  int joined_ = 0;
  int active_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_mu;

// After fork() the child has none of the parent's workers (and the pool's
// mutexes may be held): forget the old pool (leaked on purpose) and build a
// fresh one on the child's first parallel call.
void forget_pool_in_child() { g_pool.store(nullptr); new (&g_pool_mu) std::mutex(); }

Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return p;
  std::lock_guard<std::mutex> g(g_pool_mu);
  static bool registered = false;
  if (!registered) {
    pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    registered = true;
  }
  p = g_pool.load(std::memory_order_relaxed);
  if (!p) {
    p = new Pool();
    g_pool.store(p, std::memory_order_release);
  }
  return p;
}

}  // namespace

void parallel_for(size_t n, int threads, const std::function<void(size_t)>& fn) {
  if (threads > int(n)) threads = int(n);
  if (threads <= 1) {
    for (size_t i = 0; i < n; i++) fn(i);
    return;
  }
  pool()->run(n, threads, fn);
}

}  // namespace ckpt_ec
