// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// peft-bank-memory: what an adapter bank keeps resident, measured. For AdapterBank<float> over a
// 4096 × 4096 W with max_rank 16, at capacities K ∈ {1, 16, 64, 256} with every slot loaded, it
// reads the heap in use (glibc's mallinfo2: every byte the bank allocated, large blocks
// included) and the resident set (/proc/self/statm) before and after constructing the bank, and
// fits bytes = fixed + K · per_adapter over the capacities. The same for a VeraBank of 1,024
// tenants (r = 256) and for a workspace after its first forward. Output: one `key value ...` line
// per measurement, read by benchmarks/report.py.
#include <peft/bank.hpp>
#include <peft/peft.hpp>
#include <peft/vera_bank.hpp>

#include <cstdio>
#include <fstream>
#include <malloc.h>
#include <memory>
#include <unistd.h>
#include <vector>

namespace {

using Index = peft::Index;
using Mat = peft::RowMatrix<float>;

/// Bytes the allocator has handed out and not taken back (small and mmap'ed blocks).
double heap_in_use() {
  const struct mallinfo2 m = mallinfo2();
  return double(m.uordblks) + double(m.hblkhd);
}

/// Resident set in bytes.
double rss() {
  std::ifstream statm("/proc/self/statm");
  double size = 0, resident = 0;
  statm >> size >> resident;
  return resident * double(sysconf(_SC_PAGESIZE));
}

Mat random_matrix(Index rows, Index cols, std::uint64_t seed, double bound) {
  Mat m(rows, cols);
  peft::Rng rng(seed);
  rng.fill_uniform(m, -bound, bound);
  return m;
}

struct Delta {
  double heap;
  double rss;
};

/// Least-squares line through (k, bytes): {intercept, slope}.
std::pair<double, double> fit(const std::vector<double>& k, const std::vector<double>& bytes) {
  const double n = double(k.size());
  double sk = 0, sb = 0, skk = 0, skb = 0;
  for (std::size_t i = 0; i < k.size(); ++i) {
    sk += k[i];
    sb += bytes[i];
    skk += k[i] * k[i];
    skb += k[i] * bytes[i];
  }
  const double slope = (n * skb - sk * sb) / (n * skk - sk * sk);
  return {(sb - slope * sk) / n, slope};
}

}  // namespace

int main() {
  constexpr Index d = 4096, r = 16;
  const Mat w = random_matrix(d, d, 3, 0.02);
  const Mat a = random_matrix(r, d, 10, 0.01), b = random_matrix(d, r, 11, 0.01);
  std::printf("# peft-bank-memory: fp32, W %ld x %ld (%.0f MiB, not counted: the bank views it)\n",
              long(d), long(d), double(d * d * 4) / (1 << 20));
  std::printf("slot_formula_bytes %.0f  # max_rank (in + out) floats\n", double(r * (d + d) * 4));

  std::vector<double> ks, heaps, rsses;
  for (const Index k : {1, 16, 64, 256}) {
    const double h0 = heap_in_use(), r0 = rss();
    auto bank = std::make_unique<peft::AdapterBank<float>>(peft::frozen(w), k, r);
    for (Index j = 0; j < k; ++j) bank->load(a, b, 2.0);
    const Delta delta{heap_in_use() - h0, rss() - r0};
    std::printf("adapter_bank d %ld r %ld K %ld heap_bytes %.0f rss_bytes %.0f object_bytes %zu\n",
                long(d), long(r), long(k), delta.heap, delta.rss, sizeof(peft::AdapterBank<float>));
    ks.push_back(double(k));
    heaps.push_back(delta.heap);
    rsses.push_back(delta.rss);
  }
  const auto [heap_fixed, heap_slope] = fit(ks, heaps);
  const auto [rss_fixed, rss_slope] = fit(ks, rsses);
  std::printf(
      "adapter_bank_fit per_adapter_heap %.0f fixed_heap %.0f per_adapter_rss %.0f "
      "fixed_rss %.0f\n",
      heap_slope, heap_fixed, rss_slope, rss_fixed);

  // The workspace a reader needs (one per thread): grown by its first forward, kept after.
  for (const Index n : {32, 512}) {
    peft::AdapterBank<float> bank(peft::frozen(w), 32, r);
    for (Index j = 0; j < 32; ++j) bank.load(a, b, 2.0);
    const Mat x = random_matrix(n, d, 4, 1.0);
    Mat y(n, d);
    std::vector<int> ids(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) ids[std::size_t(i)] = int((i * 7) % 32);  // shuffled
    const double h0 = heap_in_use();
    {
      peft::Workspace<float> ws;
      bank.forward(x, ids, y, ws);
      const double h1 = heap_in_use();
      bank.forward(x, ids, y, ws);
      std::printf("workspace N %ld K 32 ids shuffled heap_bytes %.0f grows_after_warmup %.0f\n",
                  long(n), h1 - h0, heap_in_use() - h1);
    }
  }

  // VeRA: tenants share the projections; each keeps λ_d (r) and λ_b (out).
  constexpr Index vr = 256, tenants = 1024;
  peft::VeraProjections<float> proj(vr, d, d, 5);
  const double h0 = heap_in_use(), r0 = rss();
  auto vera = std::make_unique<peft::VeraBank<float>>(peft::frozen(w), proj, tenants);
  for (Index j = 0; j < tenants; ++j)
    vera->load(peft::Vector<float>::Constant(vr, 0.1f), peft::Vector<float>::Constant(d, 0.1f));
  const double heap = heap_in_use() - h0, resident = rss() - r0;
  std::printf(
      "vera_bank d %ld r %ld K %ld heap_bytes %.0f rss_bytes %.0f per_tenant_heap %.0f "
      "slot_formula_bytes %.0f\n",
      long(d), long(vr), long(tenants), heap, resident, heap / double(tenants),
      double((vr + d) * 4));
  return 0;
}
