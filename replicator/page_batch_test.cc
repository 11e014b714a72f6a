#include "replicator/page_batch.h"

#include <gtest/gtest.h>

#include <vector>

namespace remus::wire {
namespace {

TEST(PageBatch, CompressRoundTrip) {
  std::string batch;
  std::vector<uint8_t> page(kPageSize);
  for (size_t i = 0; i < page.size(); i++) page[i] = static_cast<uint8_t>(i % 7);
  for (uint64_t i = 0; i < 64; i++) AppendPageRecord(&batch, 0, i * kPageSize, i % 3 ? page.data() : nullptr);
  std::string z = CompressBatch(batch);
  EXPECT_LT(z.size(), batch.size() / 4);  // repeated pages compress well
  auto back = DecompressBatch(z, 16u << 20);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, batch);
}

TEST(PageBatch, CorruptOrOversizedCompressedBatchRefused) {
  std::string batch(100000, 'x');
  std::string z = CompressBatch(batch);
  EXPECT_EQ(DecompressBatch(z.substr(0, 3), 1 << 20).status().code(), Code::kDataLoss);
  EXPECT_EQ(DecompressBatch(z, 1000).status().code(), Code::kDataLoss);  // claims more than allowed
  std::string bad = z;
  bad.resize(bad.size() / 2);
  EXPECT_EQ(DecompressBatch(bad, 1 << 20).status().code(), Code::kDataLoss);
  std::string lie = z;
  lie[3] = static_cast<char>(lie[3] + 1);  // wrong uncompressed size
  EXPECT_EQ(DecompressBatch(lie, 1 << 20).status().code(), Code::kDataLoss);
}

}  // namespace
}  // namespace remus::wire
