#include "diskmirror/journal.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <random>
#include <set>

#include "common/io.h"
#include "diskmirror/faulty_file_io.h"
#include "diskmirror/journal_format.h"

namespace remus {
namespace {

using journal::RecordType;

constexpr uint64_t kDisk = 64 * 1024;
const std::string kJournal = "/state/web1/vda.journal";
const std::string kImage = "/state/web1/vda.img";

// One journaled operation and an epoch's worth of them.
struct Op {
  RecordType type;
  uint64_t off;
  uint64_t len;
  std::vector<uint8_t> data;  // writes
};
using Epoch = std::vector<Op>;

Op W(uint64_t off, uint64_t len, uint8_t seed) {
  Op o{RecordType::kWrite, off, len, std::vector<uint8_t>(len)};
  for (size_t i = 0; i < len; ++i) o.data[i] = static_cast<uint8_t>(seed + i * 13 + (i >> 7));
  return o;
}
Op Z(uint64_t off, uint64_t len) { return {RecordType::kZero, off, len, {}}; }
Op T(uint64_t off, uint64_t len) { return {RecordType::kTrim, off, len, {}}; }

Status AppendEpoch(Journal* j, uint64_t epoch, const Epoch& ops) {
  for (const Op& o : ops) {
    switch (o.type) {
      case RecordType::kWrite: RETURN_IF_ERROR(j->AppendWrite(epoch, o.off, o.data)); break;
      case RecordType::kZero: RETURN_IF_ERROR(j->AppendZero(epoch, o.off, o.len)); break;
      case RecordType::kTrim: RETURN_IF_ERROR(j->AppendTrim(epoch, o.off, o.len)); break;
      default: break;
    }
  }
  return OkStatus();
}

// The image after these epochs (trimmed ranges read back as zero in the
// fake, as after a punched hole).
std::vector<uint8_t> Model(const std::vector<const Epoch*>& epochs) {
  std::vector<uint8_t> img(kDisk, 0);
  for (const Epoch* e : epochs)
    for (const Op& o : *e) {
      if (o.type == RecordType::kWrite) std::copy(o.data.begin(), o.data.end(), img.begin() + o.off);
      else std::fill(img.begin() + o.off, img.begin() + o.off + o.len, 0);
    }
  return img;
}

std::vector<Epoch> SampleEpochs() {
  return {
      {W(0, 4096, 1), W(8192, 1000, 2), W(100, 50, 3)},             // 1: overlapping writes in one epoch
      {W(4096, 8192, 4), Z(0, 512), T(16384, 4096), W(200, 10, 5)},  // 2: zero and trim between writes
      {W(60000, 5536, 6), W(0, 300, 7)},                             // 3: up to the last byte
      {Z(60000, 5536), W(30000, 2000, 8)},                           // 4
  };
}

class JournalTest : public ::testing::Test {
 protected:
  void SetUp() override { MakeImage(); }

  void MakeImage() {
    auto f = io_.Open(kImage, true);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Truncate(kDisk).ok());
    ASSERT_TRUE((*f)->Sync().ok());
    image_ = std::move(f).value();
  }

  StatusOr<std::unique_ptr<Journal>> OpenJournal(JournalOptions o = {}) {
    o.disk_size = kDisk;
    o.name = "web1/vda";
    if (o.append_buffer == (1 << 20)) o.append_buffer = 100;  // many small writes: many crash points
    return Journal::Open(&io_, kJournal, o);
  }

  std::vector<uint8_t> Image() const { return io_.Contents(kImage); }

  FaultyFileIo io_;
  std::unique_ptr<File> image_;
};

// ---- format ---------------------------------------------------------------

TEST(JournalFormat, SuperblockRoundTripAndCrc) {
  journal::Superblock sb{7, 3, true, 42, kDisk};
  uint8_t slot[journal::kSlotSize];
  journal::EncodeSuperblock(sb, slot);
  EXPECT_EQ(LoadU64(slot), journal::kSuperMagic);
  auto back = journal::DecodeSuperblock(slot);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->seq, 7u);
  EXPECT_EQ(back->generation, 3u);
  EXPECT_TRUE(back->has_applied);
  EXPECT_EQ(back->applied_epoch, 42u);
  EXPECT_EQ(back->disk_size, kDisk);
  for (size_t i = 0; i < journal::kSuperUsed; ++i) {
    uint8_t bad[journal::kSlotSize];
    std::memcpy(bad, slot, sizeof bad);
    bad[i] ^= 0x10;
    EXPECT_FALSE(journal::DecodeSuperblock(bad).has_value()) << "flipped byte " << i;
  }
}

TEST(JournalFormat, RecordHeaderLayout) {
  std::vector<uint8_t> data = {1, 2, 3, 4, 5};
  journal::RecordHeader h;
  h.type = RecordType::kWrite;
  h.length = 5;
  h.generation = 2;
  h.epoch = 9;
  h.offset = 4096;
  uint8_t out[journal::kRecordHeaderSize];
  uint32_t crc = journal::EncodeRecordHeader(h, data, out);
  EXPECT_EQ(LoadU32(out), journal::kRecordMagic);
  EXPECT_EQ(out[4], 1);
  EXPECT_EQ(LoadU32(out + 8), 5u);
  EXPECT_EQ(LoadU32(out + 12), crc);
  EXPECT_EQ(LoadU64(out + 16), 2u);
  EXPECT_EQ(LoadU64(out + 24), 9u);
  EXPECT_EQ(LoadU64(out + 32), 4096u);
  journal::RecordHeader back;
  ASSERT_TRUE(journal::DecodeRecordHeader(out, &back));
  EXPECT_EQ(journal::RecordCrc(out, data), back.crc);
  data[2] ^= 1;  // the crc covers the data
  EXPECT_NE(journal::RecordCrc(out, data), back.crc);
}

TEST_F(JournalTest, FileLayoutOnDisk) {
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_TRUE((*j)->recovery().created);
  auto durable = io_.DurableContents(kJournal);
  ASSERT_EQ(durable.size(), journal::kDataStart);
  auto sb = journal::DecodeSuperblock(durable.data() + journal::kSlotOffset[1]);
  ASSERT_TRUE(sb.has_value());
  EXPECT_EQ(sb->seq, 1u);
  EXPECT_FALSE(sb->has_applied);

  Op w = W(512, 100, 9);
  ASSERT_TRUE((*j)->AppendWrite(5, w.off, w.data).ok());
  ASSERT_TRUE((*j)->AppendZero(5, 1024, 2048).ok());
  ASSERT_TRUE((*j)->Commit(5).ok());
  durable = io_.DurableContents(kJournal);
  ASSERT_EQ(durable.size(), journal::kDataStart + 3 * journal::kRecordHeaderSize + 100);
  const uint8_t* p = durable.data() + journal::kDataStart;
  journal::RecordHeader h;
  ASSERT_TRUE(journal::DecodeRecordHeader(p, &h));
  EXPECT_EQ(h.type, RecordType::kWrite);
  EXPECT_EQ(h.epoch, 5u);
  EXPECT_EQ(h.offset, 512u);
  EXPECT_EQ(h.length, 100u);
  EXPECT_EQ(journal::RecordCrc(p, {p + journal::kRecordHeaderSize, 100}), h.crc);
  EXPECT_EQ(std::vector<uint8_t>(p + 40, p + 140), w.data);
  p += 140;
  ASSERT_TRUE(journal::DecodeRecordHeader(p, &h));
  EXPECT_EQ(h.type, RecordType::kZero);
  EXPECT_EQ(h.length, 2048u);
  p += 40;
  ASSERT_TRUE(journal::DecodeRecordHeader(p, &h));
  EXPECT_EQ(h.type, RecordType::kCommit);
  EXPECT_EQ(h.epoch, 5u);
  EXPECT_EQ(h.offset, 2u) << "a commit record counts its epoch's records";
  EXPECT_EQ(journal::RecordCrc(p, {}), h.crc);
}

// ---- normal operation -----------------------------------------------------

TEST_F(JournalTest, CommitThenApplyWritesTheImageAndTruncates) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  for (uint64_t e = 1; e <= 3; ++e) {
    ASSERT_TRUE(AppendEpoch(j->get(), e, epochs[e - 1]).ok());
    ASSERT_TRUE((*j)->Commit(e).ok());
  }
  EXPECT_EQ((*j)->pending_epochs(), 3u);
  EXPECT_EQ(Image(), Model({})) << "nothing reaches the image before ApplyCommitted";
  ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0], &epochs[1], &epochs[2]}));
  EXPECT_EQ(io_.DurableContents(kImage), Image()) << "the image is synced before the journal forgets";
  EXPECT_EQ((*j)->applied_epoch(), 3u);
  EXPECT_EQ((*j)->pending_epochs(), 0u);
  EXPECT_EQ(io_.Contents(kJournal).size(), journal::kDataStart);

  // And it goes on.
  ASSERT_TRUE(AppendEpoch(j->get(), 4, epochs[3]).ok());
  ASSERT_TRUE((*j)->Commit(4).ok());
  ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0], &epochs[1], &epochs[2], &epochs[3]}));
}

TEST_F(JournalTest, EpochRulesAndBounds) {
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  std::vector<uint8_t> d(10, 1);
  EXPECT_EQ((*j)->AppendWrite(1, kDisk - 5, d).code(), Code::kOutOfRange);
  EXPECT_EQ((*j)->AppendWrite(1, ~0ull - 3, d).code(), Code::kOutOfRange) << "offset + length overflows";
  EXPECT_EQ((*j)->AppendZero(1, kDisk, 1).code(), Code::kOutOfRange);
  EXPECT_EQ((*j)->AppendTrim(1, 1, ~0ull).code(), Code::kOutOfRange);
  ASSERT_TRUE((*j)->AppendWrite(2, 0, d).ok());
  EXPECT_EQ((*j)->AppendWrite(3, 0, d).code(), Code::kFailedPrecondition) << "epoch 2 is open";
  EXPECT_EQ((*j)->Commit(3).code(), Code::kFailedPrecondition);
  ASSERT_TRUE((*j)->Commit(2).ok());
  EXPECT_EQ((*j)->AppendWrite(2, 0, d).code(), Code::kFailedPrecondition) << "epoch 2 is committed";
  EXPECT_EQ((*j)->Commit(1).code(), Code::kFailedPrecondition);
  uint64_t syncs = io_.syncs();
  ASSERT_TRUE((*j)->Commit(3).ok()) << "an epoch without disk writes";
  EXPECT_EQ(io_.syncs(), syncs) << "needs no I/O";
  EXPECT_EQ((*j)->last_committed(), 3u);
}

TEST_F(JournalTest, ReopenReplaysCommittedEpochsNotYetApplied) {
  auto epochs = SampleEpochs();
  {
    auto j = OpenJournal();
    ASSERT_TRUE(j.ok());
    ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
    ASSERT_TRUE((*j)->Commit(1).ok());
    ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
    ASSERT_TRUE(AppendEpoch(j->get(), 2, epochs[1]).ok());
    ASSERT_TRUE((*j)->Commit(2).ok());
  }
  io_.Crash();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ((*j)->recovery().applied_epoch, 1u);
  EXPECT_EQ((*j)->recovery().committed_pending, std::vector<uint64_t>{2});
  EXPECT_EQ((*j)->last_committed(), 2u);
  ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0], &epochs[1]}));
  EXPECT_EQ((*j)->AppendWrite(2, 0, epochs[0][0].data).code(), Code::kFailedPrecondition);
  ASSERT_TRUE(AppendEpoch(j->get(), 3, epochs[2]).ok());
  ASSERT_TRUE((*j)->Commit(3).ok());
}

TEST_F(JournalTest, ApplyKeepsTheOpenEpochInANewGeneration) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
  ASSERT_TRUE((*j)->Commit(1).ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 2, epochs[1]).ok());  // open while applying
  ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0]}));
  // Epoch 2's records now start the journal, re-stamped.
  auto contents = io_.Contents(kJournal);
  journal::RecordHeader h;
  ASSERT_TRUE(journal::DecodeRecordHeader(contents.data() + journal::kDataStart, &h));
  EXPECT_EQ(h.epoch, 2u);
  EXPECT_EQ(h.generation, 2u);
  ASSERT_TRUE((*j)->Commit(2).ok());
  j->reset();
  io_.Crash();
  auto j2 = OpenJournal();
  ASSERT_TRUE(j2.ok()) << j2.status().ToString();
  EXPECT_EQ((*j2)->recovery().committed_pending, std::vector<uint64_t>{2});
  ASSERT_TRUE((*j2)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0], &epochs[1]}));
}

TEST_F(JournalTest, DropUncommittedForgetsTheOpenEpoch) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
  ASSERT_TRUE((*j)->Commit(1).ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 2, epochs[1]).ok());
  ASSERT_TRUE((*j)->DropUncommitted().ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 3, epochs[2]).ok()) << "epoch 2 was aborted; 3 follows";
  ASSERT_TRUE((*j)->Commit(3).ok());
  j->reset();
  io_.Crash();
  auto j2 = OpenJournal();
  ASSERT_TRUE(j2.ok()) << j2.status().ToString();
  EXPECT_EQ((*j2)->recovery().committed_pending, (std::vector<uint64_t>{1, 3}));
  ASSERT_TRUE((*j2)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0], &epochs[2]}));
}

TEST_F(JournalTest, DiscardAfterDropsEpochsTheCheckpointNeverCommitted) {
  auto epochs = SampleEpochs();
  {
    auto j = OpenJournal();
    ASSERT_TRUE(j.ok());
    for (uint64_t e = 1; e <= 3; ++e) {
      ASSERT_TRUE(AppendEpoch(j->get(), e, epochs[e - 1]).ok());
      ASSERT_TRUE((*j)->Commit(e).ok());
    }
  }
  JournalOptions o;
  o.discard_after = 2;
  auto j = OpenJournal(o);
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ((*j)->recovery().committed_pending, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ((*j)->recovery().discarded_epochs, std::vector<uint64_t>{3});
  ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0], &epochs[1]}));
  ASSERT_TRUE(AppendEpoch(j->get(), 3, epochs[3]).ok()) << "epoch 3 can be received again";
  ASSERT_TRUE((*j)->Commit(3).ok());
  ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
  j->reset();
  o.discard_after = 2;
  auto again = OpenJournal(o);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), Code::kFailedPrecondition) << again.status().ToString();
}

TEST_F(JournalTest, DiskSizeMismatchRefused) {
  ASSERT_TRUE(OpenJournal().ok());
  auto j = Journal::Open(&io_, kJournal, JournalOptions{kDisk * 2, "web1/vda", 1 << 20, std::nullopt});
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(j.status().message().find("web1/vda"), std::string::npos) << j.status().message();
}

// ---- crash at every step ----------------------------------------------------

// The run every crash test replays: epochs 1..4 with applies in between, one
// of them while epoch 3 is open (so its records move to a new generation).
// Stops at the first error, as the backup stops acking.
struct Outcome {
  std::vector<uint64_t> acked;      // Commit returned OK
  std::optional<uint64_t> inflight; // Commit was called and failed
};

Outcome RunScenario(FaultyFileIo* io, File* image, const std::vector<Epoch>& epochs) {
  Outcome out;
  JournalOptions o;
  o.disk_size = kDisk;
  o.append_buffer = 3000;
  auto jo = Journal::Open(io, kJournal, o);
  if (!jo.ok()) return out;
  Journal* j = jo->get();
  auto commit = [&](uint64_t e) {
    Status s = j->Commit(e);
    if (s.ok()) out.acked.push_back(e);
    else out.inflight = e;
    return s.ok();
  };
  if (!AppendEpoch(j, 1, epochs[0]).ok() || !commit(1)) return out;
  if (!j->ApplyCommitted(image).ok()) return out;
  if (!AppendEpoch(j, 2, epochs[1]).ok() || !commit(2)) return out;
  if (!AppendEpoch(j, 3, epochs[2]).ok()) return out;
  if (!j->ApplyCommitted(image).ok()) return out;
  if (!commit(3)) return out;
  if (!j->ApplyCommitted(image).ok()) return out;
  if (!AppendEpoch(j, 4, epochs[3]).ok() || !commit(4)) return out;
  return out;
}

TEST(JournalCrash, RecoveryAfterACrashAtEveryStepHasExactlyTheCommittedEpochs) {
  auto epochs = SampleEpochs();
  auto setup = [](FaultyFileIo* io) {
    auto f = io->Open(kImage, true);
    EXPECT_TRUE(f.ok());
    EXPECT_TRUE((*f)->Truncate(kDisk).ok());
    EXPECT_TRUE((*f)->Sync().ok());
    return std::move(f).value();
  };
  uint64_t total_ops;
  {
    FaultyFileIo io;
    auto image = setup(&io);
    uint64_t before = io.mutating_ops();
    Outcome o = RunScenario(&io, image.get(), epochs);
    ASSERT_EQ(o.acked, (std::vector<uint64_t>{1, 2, 3, 4}));
    total_ops = io.mutating_ops() - before;
  }
  ASSERT_GT(total_ops, 30u);

  // After power returns, unsynced operations are lost entirely, or some of
  // them survive in order (and the next write torn), or a random subset
  // survives; independently per file.
  const std::vector<FaultyFileIo::CrashOptions> crashes = {{0, 0},    {1, 0},       {0, 13},      {2, 45},
                                                            {3, 0},    {1000, 0},    {0, 0, 1},    {0, 0, 2},
                                                            {0, 0, 3}, {0, 0, 4}};
  int runs = 0;
  for (uint64_t k = 0; k <= total_ops; ++k) {
    for (const auto& crash : crashes) {
      FaultyFileIo io;
      auto image = setup(&io);
      io.CutPowerAfter(k);
      Outcome o = RunScenario(&io, image.get(), epochs);
      io.Crash(crash);

      auto j = Journal::Open(&io, kJournal, JournalOptions{kDisk, "", 1 << 20, std::nullopt});
      ASSERT_TRUE(j.ok()) << "crash after op " << k << ": " << j.status().ToString();
      ASSERT_TRUE((*j)->ApplyCommitted(image.get()).ok()) << "crash after op " << k;
      std::vector<const Epoch*> acked;
      for (uint64_t e : o.acked) acked.push_back(&epochs[e - 1]);
      auto img = io.Contents(kImage);
      bool as_acked = img == Model(acked);
      bool with_inflight = false;
      if (o.inflight) {
        auto more = acked;
        more.push_back(&epochs[*o.inflight - 1]);
        with_inflight = img == Model(more);
      }
      ASSERT_TRUE(as_acked || with_inflight)
          << "crash after op " << k << " (keep " << crash.keep_unsynced_ops << ", tear " << crash.tear_bytes
          << "): acked " << o.acked.size() << " epochs; the image holds neither exactly those nor those plus epoch "
          << o.inflight.value_or(0);
      std::optional<uint64_t> last = o.acked.empty() ? std::nullopt : std::optional<uint64_t>(o.acked.back());
      if (with_inflight && !as_acked) last = o.inflight;
      if (last) {
        EXPECT_EQ((*j)->last_committed(), last) << "crash after op " << k;
      }
      // The recovered journal keeps working.
      uint64_t next = (*j)->last_committed().value_or(0) + 1;
      ASSERT_TRUE((*j)->AppendWrite(next, 0, std::vector<uint8_t>(10, 0xee)).ok());
      ASSERT_TRUE((*j)->Commit(next).ok()) << "crash after op " << k;
      runs++;
    }
  }
  EXPECT_EQ(runs, static_cast<int>((total_ops + 1) * crashes.size()));
}

// ---- fsync failure, a full disk, I/O errors -------------------------------

TEST_F(JournalTest, FailedFsyncOfRecordsNeverCommits) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
  ASSERT_TRUE((*j)->Commit(1).ok());
  io_.AddFault({FaultyFileIo::Op::kSync, EIO, "journal", 0, 1});
  ASSERT_TRUE(AppendEpoch(j->get(), 2, epochs[1]).ok());
  Status s = (*j)->Commit(2);
  EXPECT_EQ(s.code(), Code::kDataLoss) << s.ToString();
  EXPECT_NE(s.message().find("epoch 2 is not committed"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("web1/vda"), std::string::npos) << s.message();
  EXPECT_EQ((*j)->last_committed(), 1u);
  // Sticky: nothing may be retried or acked after a failed fsync.
  EXPECT_EQ((*j)->Commit(2).code(), Code::kDataLoss);
  EXPECT_EQ((*j)->AppendWrite(2, 0, epochs[0][0].data).code(), Code::kDataLoss);
  EXPECT_EQ((*j)->ApplyCommitted(image_.get()).code(), Code::kDataLoss);
  j->reset();
  io_.ClearFaults();
  io_.Crash();
  auto j2 = OpenJournal();
  ASSERT_TRUE(j2.ok()) << j2.status().ToString();
  EXPECT_EQ((*j2)->recovery().committed_pending, std::vector<uint64_t>{1});
  ASSERT_TRUE((*j2)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0]}));
}

TEST_F(JournalTest, FailedFsyncOfTheCommitRecordIsNotACommit) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
  io_.AddFault({FaultyFileIo::Op::kSync, EIO, "journal", 1, 1});  // the second sync: after COMMIT
  Status s = (*j)->Commit(1);
  EXPECT_EQ(s.code(), Code::kDataLoss) << s.ToString();
  EXPECT_FALSE((*j)->last_committed().has_value());
  j->reset();
  io_.ClearFaults();
  io_.Crash();  // the unsynced commit record is lost
  auto j2 = OpenJournal();
  ASSERT_TRUE(j2.ok());
  EXPECT_TRUE((*j2)->recovery().committed_pending.empty());
  EXPECT_FALSE((*j2)->last_committed().has_value());
}

TEST_F(JournalTest, FullDiskIsResourceExhaustedAndNeverCommits) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
  ASSERT_TRUE((*j)->Commit(1).ok());
  io_.SetSpaceLeft(5000);  // epoch 2 needs about 8.3 KB
  Status s = AppendEpoch(j->get(), 2, epochs[1]);
  if (s.ok()) s = (*j)->Commit(2);
  EXPECT_EQ(s.code(), Code::kResourceExhausted) << s.ToString();
  EXPECT_NE(s.message().find("web1/vda"), std::string::npos) << s.message();
  EXPECT_EQ((*j)->last_committed(), 1u);
  EXPECT_EQ((*j)->Commit(2).code(), Code::kResourceExhausted) << "sticky";
  j->reset();
  io_.ClearFaults();
  io_.Crash({1000, 0});  // even if the partial records survive
  auto j2 = OpenJournal();
  ASSERT_TRUE(j2.ok()) << j2.status().ToString();
  EXPECT_EQ((*j2)->recovery().committed_pending, std::vector<uint64_t>{1});
  EXPECT_TRUE((*j2)->recovery().torn_tail || (*j2)->recovery().dropped_records > 0);
  ASSERT_TRUE((*j2)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0]}));
}

TEST_F(JournalTest, ImageWriteErrorStopsTheJournalUntilReopened) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
  ASSERT_TRUE((*j)->Commit(1).ok());
  io_.AddFault({FaultyFileIo::Op::kWrite, EIO, ".img", 1, 1});
  Status s = (*j)->ApplyCommitted(image_.get());
  EXPECT_EQ(s.code(), Code::kDataLoss) << s.ToString();
  EXPECT_NE(s.message().find("applying epochs 1..1"), std::string::npos) << s.message();
  EXPECT_EQ((*j)->Commit(2).code(), Code::kDataLoss) << "no further ack after a failed apply";
  j->reset();
  io_.ClearFaults();
  auto j2 = OpenJournal();
  ASSERT_TRUE(j2.ok());
  EXPECT_EQ((*j2)->recovery().committed_pending, std::vector<uint64_t>{1});
  ASSERT_TRUE((*j2)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs[0]}));
}

TEST_F(JournalTest, FullImageFilesystemDuringApply) {
  auto epochs = SampleEpochs();
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok());
  // An image that is still short (sparse images grow): writes past its end
  // need space.
  ASSERT_TRUE(image_->Truncate(0).ok());
  ASSERT_TRUE(AppendEpoch(j->get(), 1, epochs[0]).ok());
  ASSERT_TRUE((*j)->Commit(1).ok());
  io_.SetSpaceLeft(100);
  Status s = (*j)->ApplyCommitted(image_.get());
  EXPECT_EQ(s.code(), Code::kResourceExhausted) << s.ToString();
  EXPECT_EQ((*j)->failure().code(), Code::kResourceExhausted);
}

// ---- torn and corrupt records ---------------------------------------------

class JournalDamageTest : public JournalTest {
 protected:
  // Commits epochs 1 and 2 and leaves epoch 3 written but uncommitted.
  void Build() {
    epochs_ = SampleEpochs();
    auto j = OpenJournal();
    ASSERT_TRUE(j.ok());
    for (uint64_t e = 1; e <= 2; ++e) {
      ASSERT_TRUE(AppendEpoch(j->get(), e, epochs_[e - 1]).ok());
      ASSERT_TRUE((*j)->Commit(e).ok());
    }
    committed_end_ = (*j)->size_bytes();
    ASSERT_TRUE(AppendEpoch(j->get(), 3, epochs_[2]).ok());
    // Big enough to push the buffered records of epoch 3 into the file.
    ASSERT_TRUE((*j)->AppendWrite(3, 0, std::vector<uint8_t>(200, 0x33)).ok());
  }

  std::vector<Epoch> epochs_;
  uint64_t committed_end_ = 0;
};

TEST_F(JournalDamageTest, TornTailIsDropped) {
  Build();
  auto f = io_.Contents(kJournal);
  ASSERT_GT(f.size(), committed_end_ + 50) << "part of epoch 3 reached the file";
  for (uint64_t cut : {committed_end_ + 1, committed_end_ + 39, committed_end_ + 41, static_cast<uint64_t>(f.size() - 1)}) {
    io_.SetContents(kJournal, {f.begin(), f.begin() + static_cast<ptrdiff_t>(cut)});
    auto j = OpenJournal();
    ASSERT_TRUE(j.ok()) << "cut at " << cut << ": " << j.status().ToString();
    EXPECT_EQ((*j)->recovery().committed_pending, (std::vector<uint64_t>{1, 2})) << "cut at " << cut;
    EXPECT_EQ(io_.DurableContents(kJournal).size(), committed_end_) << "the tail is cut durably";
  }
}

TEST_F(JournalDamageTest, CorruptUncommittedRecordIsDropped) {
  Build();
  auto f = io_.Contents(kJournal);
  f[committed_end_ + 45] ^= 0xff;  // data of epoch 3's first record
  io_.SetContents(kJournal, f);
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ((*j)->recovery().committed_pending, (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE((*j)->recovery().torn_tail);
  ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());
  EXPECT_EQ(Image(), Model({&epochs_[0], &epochs_[1]}));
}

TEST_F(JournalDamageTest, CorruptCommittedRecordIsDataLossNotSilence) {
  Build();
  auto f = io_.Contents(kJournal);
  f[journal::kDataStart + 60] ^= 0x01;  // data of epoch 1's first write
  io_.SetContents(kJournal, f);
  auto j = OpenJournal();
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), Code::kDataLoss);
  EXPECT_NE(j.status().message().find("committed disk writes are lost"), std::string::npos) << j.status().message();
}

TEST_F(JournalDamageTest, CorruptCommitRecordOfTheLastEpochIsDataLoss) {
  Build();
  auto f = io_.Contents(kJournal);
  f[committed_end_ - 40 + 33] ^= 0x01;  // the count in epoch 2's COMMIT: its crc no longer matches
  io_.SetContents(kJournal, f);
  auto j = OpenJournal();
  // Epoch 2's commit is unreadable and nothing after it proves it existed:
  // indistinguishable from a torn commit, so epoch 2 is dropped.
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ((*j)->recovery().committed_pending, std::vector<uint64_t>{1});
}

TEST_F(JournalDamageTest, DamagedSuperblocks) {
  Build();
  {
    auto j = OpenJournal();
    ASSERT_TRUE(j.ok());
    ASSERT_TRUE((*j)->ApplyCommitted(image_.get()).ok());  // superblock seq 2 (generation 2) into slot 0
    ASSERT_TRUE(AppendEpoch(j->get(), 3, epochs_[2]).ok());
    ASSERT_TRUE((*j)->Commit(3).ok());
  }
  const auto f = io_.Contents(kJournal);

  // The older slot damaged: nothing lost.
  auto g = f;
  g[512 + 10] ^= 0xff;
  io_.SetContents(kJournal, g);
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ((*j)->recovery().applied_epoch, 2u);
  EXPECT_EQ((*j)->recovery().committed_pending, std::vector<uint64_t>{3});
  j->reset();

  // The newer slot damaged: the older one does not know generation 2, whose
  // commit of epoch 3 is then found beyond the "end": data loss, said so.
  g = f;
  g[10] ^= 0xff;
  io_.SetContents(kJournal, g);
  j = OpenJournal();
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), Code::kDataLoss) << j.status().ToString();

  // Both damaged.
  g[512 + 10] ^= 0xff;
  io_.SetContents(kJournal, g);
  j = OpenJournal();
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), Code::kDataLoss);
  EXPECT_NE(j.status().message().find("superblocks"), std::string::npos) << j.status().message();
}

// A journal created over a short file whose first bytes hold a valid
// superblock (of whatever used the file before) must not let that stale
// slot outrank its own: the stale one names another generation, so the new
// journal's committed records would be dropped as dead on the next open.
// Found by tests/fuzz/fuzz_journal.
TEST_F(JournalTest, CreateOverAShortFileClearsAStaleSuperblock) {
  uint8_t slot[journal::kSlotSize];
  journal::EncodeSuperblock(journal::Superblock{/*seq=*/9, /*generation=*/7, false, 0, kDisk}, slot);
  io_.SetContents(kJournal, std::vector<uint8_t>(slot, slot + 200));  // shorter than a slot: not read as one
  {
    auto j = OpenJournal();
    ASSERT_TRUE(j.ok()) << j.status().ToString();
    EXPECT_TRUE((*j)->recovery().created);
    ASSERT_TRUE(AppendEpoch(j->get(), 1, SampleEpochs()[0]).ok());
    ASSERT_TRUE((*j)->Commit(1).ok());
  }
  auto j = OpenJournal();
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ((*j)->recovery().committed_pending, std::vector<uint64_t>{1}) << "the committed epoch survives";
}

TEST_F(JournalDamageTest, RandomGarbageNeverCrashesRecovery) {
  Build();
  auto f = io_.Contents(kJournal);
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    auto g = f;
    int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) g[journal::kDataStart + rng() % (g.size() - journal::kDataStart)] ^= static_cast<uint8_t>(1 + rng() % 255);
    if (rng() % 3 == 0) g.resize(journal::kDataStart + rng() % (g.size() - journal::kDataStart));
    io_.SetContents(kJournal, g);
    auto j = OpenJournal();
    if (!j.ok()) {
      EXPECT_EQ(j.status().code(), Code::kDataLoss) << j.status().ToString();
      continue;
    }
    // Whatever survived is a prefix of the committed epochs.
    const auto& p = (*j)->recovery().committed_pending;
    EXPECT_LE(p.size(), 2u);
    for (size_t k = 0; k < p.size(); ++k) EXPECT_EQ(p[k], k + 1);
  }
}

}  // namespace
}  // namespace remus
