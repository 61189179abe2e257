// pybind11 bindings of ckpt._C (docs/INTERNALS.md section 1). Addresses and
// sizes are Python ints; every call that can block releases the GIL; failures
// raise ckpt._C.NativeError (the same class as ckpt.errors.NativeError).
#include <pybind11/pybind11.h>

#include <vector>
#include <pybind11/stl.h>

#include <cstring>
#include <limits>

#include "copy_engine.h"
#include "crc32c.h"
#include "crc32c_split.h"
#include "native_error.h"
#include "segment.h"

namespace py = pybind11;
using namespace ckpt;

namespace {

PyObject* g_native_error = nullptr;

constexpr size_t kReleaseGilBytes = 64 * 1024;

[[noreturn]] void fail(const std::string& msg) { throw NativeErrorCpp(msg); }

uint64_t as_u64(py::handle h, const std::string& call, const std::string& what) {
  if (!PyLong_Check(h.ptr()))
    fail(call + ": " + what + " must be an int, got " + std::string(py::str(py::type::of(h).attr("__name__"))));
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow != 0 || v < 0)
    fail(call + ": " + what + " = " + std::string(py::str(h)) + " is out of range; it must be >= 0 and < 2**63");
  return static_cast<uint64_t>(v);
}

// from_file: jobs are (file_offset, dst_addr, nbytes); an offset may be 0 and cannot overlap.
std::vector<CopyJob> parse_jobs(py::handle jobs, const std::string& call, size_t arity,
                                bool from_file = false) {
  if (!py::isinstance<py::sequence>(jobs)) fail(call + ": jobs must be a list of tuples");
  auto seq = py::reinterpret_borrow<py::sequence>(jobs);
  std::vector<CopyJob> out;
  out.reserve(seq.size());
  const char* shape = from_file ? "(file_offset, dst_addr, nbytes)"
                      : arity == 3 ? "(src_addr, dst_addr, nbytes)" : "(addr, nbytes)";
  for (size_t i = 0; i < seq.size(); i++) {
    py::object item = seq[i];
    std::string where = "job " + std::to_string(i);
    if (!py::isinstance<py::sequence>(item) || py::len(item) != arity)
      fail(call + ": " + where + " must be a tuple " + shape);
    auto t = py::reinterpret_borrow<py::sequence>(item);
    CopyJob j;
    if (from_file) {
      j.src = as_u64(t[0], call, where + " file_offset");
      j.dst = as_u64(t[1], call, where + " dst_addr");
      j.nbytes = as_u64(t[2], call, where + " nbytes");
      if (j.nbytes && j.dst == 0) fail(call + ": " + where + " has a null dst_addr");
      if (j.src > (1ull << 62) || j.nbytes > (1ull << 62)) fail(call + ": " + where + " is beyond any file");
    } else if (arity == 3) {
      j.src = as_u64(t[0], call, where + " src_addr");
      j.dst = as_u64(t[1], call, where + " dst_addr");
      j.nbytes = as_u64(t[2], call, where + " nbytes");
      if (j.nbytes && (j.src == 0 || j.dst == 0)) fail(call + ": " + where + " has a null address");
      if (j.nbytes && j.src < j.dst + j.nbytes && j.dst < j.src + j.nbytes)
        fail(call + ": " + where + " source and destination overlap");
    } else {
      j.src = as_u64(t[0], call, where + " addr");
      j.nbytes = as_u64(t[1], call, where + " nbytes");
      if (j.nbytes && j.src == 0) fail(call + ": " + where + " has a null address");
    }
    out.push_back(j);
  }
  return out;
}

// Longer waits (inf included) are "forever": a duration of 1e10 s or more overflows the
// clock's nanoseconds and would make wait_for return at once.
constexpr double kForeverS = 1e9;

double as_timeout(py::object timeout_s) {
  if (timeout_s.is_none()) return -1.0;
  double t = py::cast<double>(timeout_s);
  if (!(t >= 0)) fail("CopyTicket.wait: timeout_s must be >= 0 or None, got " + std::string(py::str(timeout_s)));
  return t >= kForeverS ? -1.0 : t;
}

// A writable byte buffer over one slot; keeps the mapping alive while any
// memoryview of it exists, so closing the Segment never leaves a dangling view.
struct SlotBuffer {
  std::shared_ptr<Mapping> map;
  unsigned char* ptr;
  uint64_t nbytes;
};

struct EngineHandle {
  std::shared_ptr<CopyEngine> engine;
  CopyEngine& get(const char* call) {
    if (!engine) fail(std::string("CopyEngine.") + call + ": the CopyEngine is closed; create a new one");
    return *engine;
  }
};

uint32_t crc_of_buffer(py::handle data, uint32_t value) {
  Py_buffer view;
  if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) {
    PyErr_Clear();
    fail("crc32c: data must be a C-contiguous buffer (bytes, bytearray, memoryview, numpy array), got " +
         std::string(py::str(py::type::of(data).attr("__name__"))));
  }
  uint32_t crc;
  if (static_cast<size_t>(view.len) >= kReleaseGilBytes) {
    py::gil_scoped_release nogil;
    crc = crc32c(view.buf, static_cast<size_t>(view.len), value);
  } else {
    crc = crc32c(view.buf, static_cast<size_t>(view.len), value);
  }
  PyBuffer_Release(&view);
  return crc;
}

// The GPU checksum's algorithm (crc32c_split.h) run on the host: `parts` pieces, each
// checksummed alone, then joined. Tests hold it to crc32c; cuda_crc.cu runs the same code.
uint32_t crc_split_of_buffer(py::handle data, unsigned parts) {
  static constexpr ckpt_crc::Tables kTables = ckpt_crc::make_tables();
  static constexpr ckpt_crc::Powers kPowers = ckpt_crc::make_powers();
  if (parts < 1 || parts > 4096) fail("crc32c_split: parts must be between 1 and 4096, got " + std::to_string(parts));
  Py_buffer view;
  if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) {
    PyErr_Clear();
    fail("crc32c_split: data must be a C-contiguous buffer");
  }
  const auto* p = static_cast<const uint8_t*>(view.buf);
  const uint64_t len = static_cast<uint64_t>(view.len);
  std::vector<uint32_t> crcs(parts);
  for (unsigned i = 0; i < parts; i++) {
    ckpt_crc::Piece pc = ckpt_crc::piece_of(len, parts, i);
    crcs[i] = ckpt_crc::crc_bytes(kTables, p + pc.begin, pc.end - pc.begin);
  }
  uint32_t crc = ckpt_crc::join_pieces(kPowers, crcs.data(), len, parts);
  PyBuffer_Release(&view);
  return crc;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ckpt native core: crc32c, the copy engine, shared-memory segments (docs/INTERNALS.md)";

  // One exception class for Python: reuse ckpt.errors.NativeError when the
  // package is importable (so callers need no mapping), else define our own.
  try {
    py::object cls = py::module_::import("ckpt.errors").attr("NativeError");
    g_native_error = cls.release().ptr();
  } catch (py::error_already_set&) {
    PyErr_Clear();
    g_native_error = PyErr_NewException("ckpt._C.NativeError", PyExc_RuntimeError, nullptr);
  }
  m.attr("NativeError") = py::handle(g_native_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const NativeErrorCpp& e) {
      PyErr_SetString(g_native_error, e.what());
    }
  });

  m.def("crc32c", &crc_of_buffer, py::arg("data"), py::arg("value") = 0,
        "crc32c of a C-contiguous buffer (zero copy), continuing from `value`.");
  m.def("crc32c_split", &crc_split_of_buffer, py::arg("data"), py::arg("parts"),
        "crc32c of a buffer computed as the GPU does it (crc32c_split.h): `parts` pieces\n"
        "checksummed alone, then joined. Equal to crc32c(data); for tests.");
  m.def(
      "crc32c_addr",
      [](py::handle addr, py::handle nbytes, uint32_t value) {
        uint64_t a = as_u64(addr, "crc32c_addr", "addr"), n = as_u64(nbytes, "crc32c_addr", "nbytes");
        if (n && !a) fail("crc32c_addr: addr is null");
        py::gil_scoped_release nogil;
        return crc32c(reinterpret_cast<const void*>(a), n, value);
      },
      py::arg("addr"), py::arg("nbytes"), py::arg("value") = 0,
      "crc32c of nbytes at a raw address, continuing from `value`. GIL released.");
  m.def(
      "crc32c_combine",
      [](uint32_t crc_a, uint32_t crc_b, py::handle len_b) {
        return crc32c_combine(crc_a, crc_b, as_u64(len_b, "crc32c_combine", "len_b"));
      },
      py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"), "crc32c(A + B) from crc32c(A), crc32c(B), len(B).");
  m.def("crc32c_impl", &crc32c_impl, "\"vpclmulqdq\", \"sse4.2\", \"armv8-crc\" or \"scalar\" (chosen once at import; CKPT_CRC_IMPL=scalar or =sse4.2 caps it).");
  m.def(
      "_crc32c_scalar",
      [](py::handle data, uint32_t value) {
        Py_buffer view;
        if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) {
          PyErr_Clear();
          fail("_crc32c_scalar: data must be a C-contiguous buffer");
        }
        uint32_t crc = crc32c_scalar(view.buf, static_cast<size_t>(view.len), value);
        PyBuffer_Release(&view);
        return crc;
      },
      py::arg("data"), py::arg("value") = 0, "The scalar oracle (tests only).");
  m.def("_fuse_mode", &crc32c_fuse_mode, "How copy and crc are fused: \"inline\" or \"blocked\".");
  m.def(
      "num_chunks",
      [](py::handle sizes, py::handle chunk_bytes) {
        auto seq = py::reinterpret_borrow<py::sequence>(sizes);
        std::vector<uint64_t> v;
        for (size_t i = 0; i < seq.size(); i++)
          v.push_back(as_u64(seq[i], "num_chunks", "job_sizes[" + std::to_string(i) + "]"));
        return count_chunks(v, as_u64(chunk_bytes, "num_chunks", "chunk_bytes"));
      },
      py::arg("job_sizes"), py::arg("chunk_bytes"),
      "Number of chunks the copy engine cuts these jobs into (an empty job has none).");

  py::class_<CopyTicket>(m, "CopyTicket", "Completion handle of one submit; valid after its engine is gone.")
      .def(
          "wait",
          [](CopyTicket& t, py::object timeout_s) {
            double to = as_timeout(timeout_s);
            py::gil_scoped_release nogil;
            return t.wait(to);
          },
          py::arg("timeout_s") = py::none(),
          "Block up to timeout_s (None: forever). True when done; re-raises a worker's error.")
      .def("done", &CopyTicket::done)
      .def_property_readonly("bytes_total", &CopyTicket::bytes_total);

  py::class_<EngineHandle>(m, "CopyEngine", "Persistent pool of copy workers. Thread-safe.")
      .def(py::init([](int threads, int nice) {
             // In a child of fork() the engine's condition variable still counts the
             // parent's waiting workers, so destroying it would block: leak it there.
             return EngineHandle{std::shared_ptr<CopyEngine>(new CopyEngine(threads, nice), [](CopyEngine* e) {
               e->close();
               if (!e->forked()) delete e;
             })};
           }),
           py::arg("threads"), py::arg("nice") = 0,
           "threads workers; nice 0..19 lowers their priority (Linux, per thread).")
      .def(
          "submit",
          [](EngineHandle& h, py::handle jobs, py::handle chunk_bytes, py::handle crc_out_addr) {
            auto j = parse_jobs(jobs, "CopyEngine.submit", 3);
            uint64_t cb = as_u64(chunk_bytes, "CopyEngine.submit", "chunk_bytes");
            uint64_t out = as_u64(crc_out_addr, "CopyEngine.submit", "crc_out_addr");
            return h.get("submit").submit(j, cb, out, BatchMode::kCopy);
          },
          py::arg("jobs"), py::arg("chunk_bytes"), py::arg("crc_out_addr"),
          "Copy [(src, dst, nbytes)], storing crc32c of each chunk at crc_out_addr + 4*k "
          "(0: plain parallel memcpy). Returns at once with a CopyTicket.")
      .def(
          "crc_chunks",
          [](EngineHandle& h, py::handle jobs, py::handle chunk_bytes, py::handle crc_out_addr) {
            auto j = parse_jobs(jobs, "CopyEngine.crc_chunks", 2);
            uint64_t cb = as_u64(chunk_bytes, "CopyEngine.crc_chunks", "chunk_bytes");
            uint64_t out = as_u64(crc_out_addr, "CopyEngine.crc_chunks", "crc_out_addr");
            if (out == 0) fail("CopyEngine.crc_chunks: crc_out_addr must not be 0 (where would the crcs go?)");
            return h.get("crc_chunks").submit(j, cb, out, BatchMode::kCrcOnly);
          },
          py::arg("jobs"), py::arg("chunk_bytes"), py::arg("crc_out_addr"),
          "crc32c of each chunk of [(addr, nbytes)] (same chunking as submit), no copy.")
      .def(
          "verified_copy",
          [](EngineHandle& h, py::handle jobs, py::handle chunk_bytes, py::handle expected_crc_addr,
             py::handle crc_out_addr) {
            auto j = parse_jobs(jobs, "CopyEngine.verified_copy", 3);
            uint64_t cb = as_u64(chunk_bytes, "CopyEngine.verified_copy", "chunk_bytes");
            uint64_t exp = as_u64(expected_crc_addr, "CopyEngine.verified_copy", "expected_crc_addr");
            uint64_t out = as_u64(crc_out_addr, "CopyEngine.verified_copy", "crc_out_addr");
            if (exp == 0 || out == 0)
              fail("CopyEngine.verified_copy: expected_crc_addr and crc_out_addr must not be 0");
            return h.get("verified_copy").submit(j, cb, out, BatchMode::kVerifiedCopy, exp);
          },
          py::arg("jobs"), py::arg("chunk_bytes"), py::arg("expected_crc_addr"), py::arg("crc_out_addr"),
          "Copy [(src, dst, nbytes)] chunk by chunk, each only after its source's crc32c equals "
          "expected[k] (u32 LE at expected_crc_addr + 4*k): damaged bytes never reach dst. The "
          "actual crc of every chunk goes to crc_out_addr + 4*k; compare to find the bad ones.")
      .def(
          "read_file",
          [](EngineHandle& h, int fd, py::handle jobs, py::handle chunk_bytes, py::handle crc_out_addr) {
            if (fd < 0) fail("CopyEngine.read_file: fd must be an open file descriptor, got " + std::to_string(fd));
            auto j = parse_jobs(jobs, "CopyEngine.read_file", 3, /*from_file=*/true);
            uint64_t cb = as_u64(chunk_bytes, "CopyEngine.read_file", "chunk_bytes");
            uint64_t out = as_u64(crc_out_addr, "CopyEngine.read_file", "crc_out_addr");
            return h.get("read_file").submit(j, cb, out, BatchMode::kReadFile, 0, fd);
          },
          py::arg("fd"), py::arg("jobs"), py::arg("chunk_bytes"), py::arg("crc_out_addr"),
          "pread [(file_offset, dst, nbytes)] of file fd (kept open until the ticket is done) "
          "into dst, storing the crc32c of each chunk of what was read at crc_out_addr + 4*k "
          "(0: no crc). The pages read are never mapped here: nothing to fault in or unmap. "
          "A file shorter than a job fails the ticket.")
      .def_property_readonly("threads", [](EngineHandle& h) { return h.get("threads").threads(); })
      .def(
          "close",
          [](EngineHandle& h) {
            std::shared_ptr<CopyEngine> e = std::move(h.engine);
            if (e) {
              py::gil_scoped_release nogil;
              e->close();
            }
          },
          "Finish submitted work and stop the workers. Idempotent.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](EngineHandle& h, py::args) {
        std::shared_ptr<CopyEngine> e = std::move(h.engine);
        if (e) {
          py::gil_scoped_release nogil;
          e->close();
        }
      });

  py::class_<SlotBuffer>(m, "_SlotBuffer", py::buffer_protocol())
      .def_buffer([](SlotBuffer& b) {
        return py::buffer_info(b.ptr, 1, py::format_descriptor<unsigned char>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes)}, {1}, /*readonly=*/false);
      });

  py::class_<Segment>(m, "Segment", "A POSIX shm segment with two snapshot slots (INTERNALS.md section 2).")
      .def_static(
          "create",
          [](const std::string& name, py::handle slot_bytes) {
            uint64_t sb = as_u64(slot_bytes, "Segment.create", "slot_bytes");
            py::gil_scoped_release nogil;
            return Segment::create(name, sb);
          },
          py::arg("name"), py::arg("slot_bytes"),
          "Create (O_EXCL, mode 0600) and pre-fault a segment of 4096 + 2 * slot_bytes bytes.")
      .def_static(
          "open",
          [](const std::string& name, bool populate) {
            py::gil_scoped_release nogil;
            return Segment::open(name, populate);
          },
          py::arg("name"), py::arg("populate") = true,
          "Map an existing segment; validates owner, mode, magic, version and size. populate: "
          "pre-fault every page (for writers); a reader of one slot is faster without.")
      .def_static("unlink", &Segment::unlink, py::arg("name"), "Remove the name (a missing name is not an error).")
      .def_static("exists", &Segment::exists, py::arg("name"))
      .def_property_readonly("name", &Segment::name)
      .def_property_readonly("slot_bytes", &Segment::slot_bytes)
      .def_property_readonly("size_bytes", &Segment::size_bytes)
      .def_property_readonly("closed", &Segment::closed)
      .def("slot_address", &Segment::slot_address, py::arg("i"))
      .def("fileno", &Segment::fileno,
           "The segment's file descriptor (owned by the segment, valid until close()): for "
           "CopyEngine.read_file, which reads a slot without mapping its pages here.")
      .def_property_readonly("base_address", &Segment::base_address,
                             "Address of byte 0 of the mapping (the header); size_bytes long.")
      .def(
          "slot_view",
          [](Segment& s, int i) {
            uint64_t addr = s.slot_address(i);
            SlotBuffer b{s.mapping(), reinterpret_cast<unsigned char*>(addr), s.slot_bytes()};
            return py::memoryview(py::cast(std::move(b)));
          },
          py::arg("i"), "Writable memoryview of slot i's payload area (slot_bytes long).")
      .def("try_lock", &Segment::try_lock, py::arg("i"), py::arg("owner_pid"), py::arg("mode"))
      .def("lock_owner", &Segment::lock_owner, py::arg("i"))
      .def("unlock", &Segment::unlock, py::arg("i"), py::arg("owner_pid"))
      .def("break_lock", &Segment::break_lock, py::arg("i"), py::arg("owner_pid") = 0,
           "Clear slot i's lock if `owner_pid` (0: anyone) still holds it; True if cleared. "
           "Pass the dead owner you checked, so that a lock taken since is kept.")
      .def("seal", &Segment::seal, py::arg("i"), py::arg("step"), py::arg("payload_bytes"), py::arg("payload_crc"))
      .def("mark_writing", &Segment::mark_writing, py::arg("i"))
      .def("committed", &Segment::committed)
      .def(
          "slot_info",
          [](Segment& s, int i) {
            SlotInfo info = s.slot_info(i);
            py::dict d;
            d["state"] = slot_state_name(info.state);
            d["step"] = info.step;
            d["seq"] = info.seq;
            d["payload_bytes"] = info.payload_bytes;
            d["payload_crc"] = info.payload_crc;
            return d;
          },
          py::arg("i"))
      .def("pin", &Segment::pin, "mlock the mapping; False when RLIMIT_MEMLOCK forbids it.")
      .def(
          "close",
          [](Segment& s) {
            // Detach under the GIL (other threads' calls hold it while they use the mapping),
            // then unmap without it: munmap of a GiB-sized mapping takes tens of ms.
            std::shared_ptr<Mapping> m = s.detach();
            py::gil_scoped_release nogil;
            m.reset();
          },
          "Unmap (once no slot_view is alive). Idempotent. Releases the GIL.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](Segment& s, py::args) { s.close(); })
      .def("__repr__", [](Segment& s) {
        return "<ckpt._C.Segment " + s.name() + (s.closed() ? " closed>" : " slot_bytes=" + std::to_string(s.slot_bytes()) + ">");
      });
}
