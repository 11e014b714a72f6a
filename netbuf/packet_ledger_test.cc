// PacketLedger against a fake verdict sink and a model of the kernel queue:
// epochs, batching (one verdict message per release), acks out of order,
// release before barrier, finish both ways, id wraparound, a failed send.
#include "netbuf/packet_ledger.h"

#include <gtest/gtest.h>

#include <atomic>
#include <deque>
#include <map>
#include <random>
#include <thread>
#include <vector>

namespace remus::netbuf {
namespace {

// The kernel's queue as NFQNL_MSG_VERDICT_BATCH sees it: ids in arrival
// order; a batch takes every id up to last_id (wrap-aware, like
// nfq_id_after) from the head.
class FakeQueue : public VerdictSink {
 public:
  Status Batch(uint32_t last_id, Verdict v) override {
    if (fail_next) {
      fail_next = false;
      return Unavailable("injected send failure");
    }
    batches.push_back({last_id, v});
    while (!queued.empty() && static_cast<int32_t>(last_id - queued.front()) >= 0) {
      (v == Verdict::kAccept ? accepted : dropped).push_back(queued.front());
      queued.pop_front();
    }
    return OkStatus();
  }
  // The kernel queues a packet and the reader reads it.
  uint32_t Arrive(PacketLedger& l) {
    uint32_t id = ++seq;
    queued.push_back(id);
    EXPECT_TRUE(l.OnPacket(id).ok());
    return id;
  }

  struct Call {
    uint32_t last_id;
    Verdict v;
    bool operator==(const Call&) const = default;
  };
  std::vector<Call> batches;
  std::deque<uint32_t> queued;
  std::vector<uint32_t> accepted, dropped;
  uint32_t seq = 0;
  bool fail_next = false;
};

TEST(netbuf_ledger, HoldsUntilTheEpochIsAcked) {
  FakeQueue q;
  PacketLedger l(&q);
  q.Arrive(l), q.Arrive(l), q.Arrive(l);
  ASSERT_TRUE(l.Barrier(1).ok());
  EXPECT_TRUE(q.batches.empty());
  EXPECT_EQ(l.buffered(), 3u);
  ASSERT_TRUE(l.Release(1).ok());
  EXPECT_EQ(q.batches, (std::vector<FakeQueue::Call>{{3, Verdict::kAccept}}));
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{1, 2, 3}));
  EXPECT_EQ(l.buffered(), 0u);
  EXPECT_EQ(l.released(), 3u);
}

TEST(netbuf_ledger, PacketsAfterTheBarrierWaitForTheNextEpoch) {
  FakeQueue q;
  PacketLedger l(&q);
  q.Arrive(l), q.Arrive(l);
  ASSERT_TRUE(l.Barrier(1).ok());
  q.Arrive(l), q.Arrive(l);
  ASSERT_TRUE(l.Release(1).ok());
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{1, 2}));
  EXPECT_EQ(l.buffered(), 2u);
  ASSERT_TRUE(l.Barrier(2).ok());
  ASSERT_TRUE(l.Release(2).ok());
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{1, 2, 3, 4}));
  EXPECT_EQ(q.batches.size(), 2u);
}

TEST(netbuf_ledger, BarriersWithoutPacketsSendNothing) {
  FakeQueue q;
  PacketLedger l(&q);
  ASSERT_TRUE(l.Barrier(1).ok());
  ASSERT_TRUE(l.Barrier(2).ok());
  ASSERT_TRUE(l.Release(2).ok());
  EXPECT_TRUE(q.batches.empty());
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(3).ok());
  ASSERT_TRUE(l.Barrier(4).ok());
  ASSERT_TRUE(l.Release(3).ok());
  EXPECT_EQ(q.batches, (std::vector<FakeQueue::Call>{{1, Verdict::kAccept}}));
  ASSERT_TRUE(l.Release(4).ok());
  EXPECT_EQ(q.batches.size(), 1u);
}

TEST(netbuf_ledger, ReleasingSeveralEpochsIsOneBatch) {
  FakeQueue q;
  PacketLedger l(&q);
  for (uint64_t e = 1; e <= 5; e++) {
    for (int i = 0; i < 3; i++) q.Arrive(l);
    ASSERT_TRUE(l.Barrier(e).ok());
  }
  q.Arrive(l);  // epoch 6, open
  ASSERT_TRUE(l.Release(4).ok());
  ASSERT_EQ(q.batches.size(), 1u);
  EXPECT_EQ(q.batches[0].last_id, 12u);
  EXPECT_EQ(q.accepted.size(), 12u);
  EXPECT_EQ(l.buffered(), 4u);
  EXPECT_EQ(l.released(), 12u);
}

TEST(netbuf_ledger, AckAheadOfItsBarrierReleasesAtTheBarrier) {
  FakeQueue q;
  PacketLedger l(&q);
  ASSERT_TRUE(l.Release(0).ok());  // the initial copy's ack, before any barrier
  q.Arrive(l), q.Arrive(l);
  ASSERT_TRUE(l.Release(1).ok());  // overtook Barrier(1)
  EXPECT_TRUE(q.batches.empty());  // the open epoch's end is not known yet
  ASSERT_TRUE(l.Barrier(1).ok());
  EXPECT_EQ(q.batches, (std::vector<FakeQueue::Call>{{2, Verdict::kAccept}}));
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(2).ok());  // not acked: held
  EXPECT_EQ(q.batches.size(), 1u);
  EXPECT_EQ(l.buffered(), 1u);
}

TEST(netbuf_ledger, DuplicateAndOlderAcksAreIgnored) {
  FakeQueue q;
  PacketLedger l(&q);
  for (uint64_t e = 1; e <= 3; e++) {
    q.Arrive(l);
    ASSERT_TRUE(l.Barrier(e).ok());
  }
  ASSERT_TRUE(l.Release(2).ok());
  ASSERT_TRUE(l.Release(2).ok());
  ASSERT_TRUE(l.Release(1).ok());
  EXPECT_EQ(q.batches.size(), 1u);
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{1, 2}));
  ASSERT_TRUE(l.Release(3).ok());
  EXPECT_EQ(q.batches.size(), 2u);
}

TEST(netbuf_ledger, BarrierEpochsMustIncrease) {
  FakeQueue q;
  PacketLedger l(&q);
  ASSERT_TRUE(l.Barrier(5).ok());
  EXPECT_EQ(l.Barrier(5).code(), Code::kInvalidArgument);
  EXPECT_EQ(l.Barrier(4).code(), Code::kInvalidArgument);
  EXPECT_TRUE(l.Barrier(7).ok());  // gaps are fine
}

TEST(netbuf_ledger, FinishAcceptReleasesEverythingAndLaterPacketsAtOnce) {
  FakeQueue q;
  PacketLedger l(&q);
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(1).ok());
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(2).ok());
  q.Arrive(l);
  ASSERT_TRUE(l.Finish(Verdict::kAccept).ok());
  EXPECT_EQ(q.batches, (std::vector<FakeQueue::Call>{{3, Verdict::kAccept}}));
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{1, 2, 3}));
  q.Arrive(l);  // read while the rules are being removed
  EXPECT_EQ(q.accepted.back(), 4u);
  EXPECT_TRUE(l.Barrier(3).ok());
  EXPECT_TRUE(l.Release(3).ok());
  EXPECT_TRUE(l.Finish(Verdict::kDrop).ok());  // no-op
  EXPECT_EQ(q.batches.size(), 2u);
  EXPECT_TRUE(q.dropped.empty());
  EXPECT_EQ(l.released(), 4u);
}

TEST(netbuf_ledger, FinishDropDiscardsWhatWasNotAcked) {
  FakeQueue q;
  PacketLedger l(&q);
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(1).ok());
  q.Arrive(l), q.Arrive(l);
  ASSERT_TRUE(l.Barrier(2).ok());
  q.Arrive(l);
  ASSERT_TRUE(l.Release(1).ok());
  ASSERT_TRUE(l.Finish(Verdict::kDrop).ok());
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{1}));
  EXPECT_EQ(q.dropped, (std::vector<uint32_t>{2, 3, 4}));
  q.Arrive(l);
  EXPECT_EQ(q.dropped.back(), 5u);
  EXPECT_EQ(l.discarded(), 4u);
  EXPECT_EQ(l.buffered(), 0u);
  EXPECT_TRUE(l.finished());
}

TEST(netbuf_ledger, FinishWithNothingHeldSendsNothing) {
  FakeQueue q;
  PacketLedger l(&q);
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(1).ok());
  ASSERT_TRUE(l.Release(1).ok());
  ASSERT_TRUE(l.Finish(Verdict::kAccept).ok());
  EXPECT_EQ(q.batches.size(), 1u);
}

TEST(netbuf_ledger, IdsWrapAround) {
  FakeQueue q;
  q.seq = 0xfffffffdu;
  PacketLedger l(&q);
  q.Arrive(l), q.Arrive(l);  // fffffffe, ffffffff
  ASSERT_TRUE(l.Barrier(1).ok());
  q.Arrive(l), q.Arrive(l);  // 0, 1
  ASSERT_TRUE(l.Barrier(2).ok());
  ASSERT_TRUE(l.Release(1).ok());
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{0xfffffffeu, 0xffffffffu}));
  ASSERT_TRUE(l.Release(2).ok());
  EXPECT_EQ(q.batches.back().last_id, 1u);
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{0xfffffffeu, 0xffffffffu, 0, 1}));
}

TEST(netbuf_ledger, AFailedBatchIsCoveredByTheNextOne) {
  FakeQueue q;
  PacketLedger l(&q);
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(1).ok());
  q.Arrive(l);
  ASSERT_TRUE(l.Barrier(2).ok());
  q.fail_next = true;
  EXPECT_EQ(l.Release(1).code(), Code::kUnavailable);
  EXPECT_TRUE(q.accepted.empty());
  ASSERT_TRUE(l.Release(2).ok());
  EXPECT_EQ(q.accepted, (std::vector<uint32_t>{1, 2}));
}

// Many epochs, random traffic, acks that lag, repeat and arrive ahead of
// their barrier: nothing leaves before its epoch is acked, order is kept,
// and every release sends at most one batch.
TEST(netbuf_ledger, RandomEpochsKeepOutputCommit) {
  std::mt19937 rng(42);
  FakeQueue q;
  PacketLedger l(&q);
  std::map<uint32_t, uint64_t> epoch_of;  // id -> epoch it was sent in
  uint64_t open = 1, acked = 0;
  std::deque<uint64_t> unacked;
  for (int step = 0; step < 20000; step++) {
    switch (rng() % 4) {
      case 0:
      case 1: epoch_of[q.Arrive(l)] = open; break;
      case 2:
        ASSERT_TRUE(l.Barrier(open).ok());
        unacked.push_back(open++);
        break;
      case 3:
        if (unacked.empty()) break;
        {
          uint64_t e = unacked[rng() % std::min<size_t>(unacked.size(), 3)];  // sometimes skip ahead
          if (rng() % 10 == 0 && e > 1) e--;                                   // or repeat an older one
          size_t before = q.batches.size();
          size_t acc_before = q.accepted.size();
          ASSERT_TRUE(l.Release(e).ok());
          EXPECT_LE(q.batches.size(), before + 1);
          acked = std::max(acked, e);
          while (!unacked.empty() && unacked.front() <= acked) unacked.pop_front();
          for (size_t i = acc_before; i < q.accepted.size(); i++) EXPECT_LE(epoch_of[q.accepted[i]], acked);
        }
        break;
    }
  }
  for (size_t i = 1; i < q.accepted.size(); i++) EXPECT_LT(q.accepted[i - 1], q.accepted[i]);
  ASSERT_TRUE(l.Finish(Verdict::kAccept).ok());
  EXPECT_TRUE(q.queued.empty());
  EXPECT_EQ(q.accepted.size(), epoch_of.size());
  EXPECT_EQ(l.released(), epoch_of.size());
}

// The reader, the epoch thread and the ACK thread at once (run under TSan
// in CI): counts add up.
TEST(netbuf_ledger, ConcurrentCallers) {
  struct CountingSink : VerdictSink {
    Status Batch(uint32_t, Verdict) override {
      calls++;
      return OkStatus();
    }
    std::atomic<int> calls{0};
  } sink;
  PacketLedger l(&sink);
  std::atomic<uint64_t> barrier{0};
  std::atomic<bool> done{false};
  std::thread reader([&] {
    for (uint32_t id = 1; id <= 100000; id++) (void)l.OnPacket(id);
    done = true;
  });
  std::thread epoch([&] {
    while (!done) (void)l.Barrier(++barrier);
  });
  std::thread acker([&] {
    while (!done) (void)l.Release(barrier.load());
  });
  reader.join();
  epoch.join();
  acker.join();
  ASSERT_TRUE(l.Finish(Verdict::kAccept).ok());
  EXPECT_EQ(l.released(), 100000u);
  EXPECT_EQ(l.buffered(), 0u);
}

}  // namespace
}  // namespace remus::netbuf
