// PlugSchedule against a model of sch_plug (net/sched/sch_plug.c: a FIFO with
// only a current and ONE closed section count). Shows why a BUFFER per
// barrier is unsafe with pipelined checkpoints, and that the schedule never
// lets a packet out before its epoch is acked.
#include "netbuf/plug_schedule.h"

#include <gtest/gtest.h>

#include <deque>
#include <random>
#include <string>
#include <vector>

namespace remus::netbuf {
namespace {

// sch_plug's state machine, packet by packet (plug_enqueue, plug_dequeue,
// plug_change), with each packet tagged by the epoch it was sent in.
class FakePlugQdisc : public PlugControl {
 public:
  Status Buffer() override {
    log += "B";
    last_epoch_ = current_epoch_;
    current_epoch_ = 0;
    if (indefinite_) throttled_ = true;
    indefinite_ = false;
    return OkStatus();
  }
  Status ReleaseOne() override {
    log += "R";
    to_release_ += last_epoch_;
    last_epoch_ = 0;
    throttled_ = false;
    Dequeue();
    return OkStatus();
  }
  Status ReleaseIndefinite() override {
    log += "I";
    indefinite_ = true;
    to_release_ = last_epoch_ = current_epoch_ = 0;
    throttled_ = false;
    Dequeue();
    return OkStatus();
  }
  void Send(uint64_t epoch) {
    fifo_.push_back(epoch);
    if (!indefinite_) current_epoch_++;
    Dequeue();
  }
  std::vector<uint64_t> sent;  // epochs of the packets that left, in order
  std::string log;
  size_t held() const { return fifo_.size(); }

 private:
  void Dequeue() {
    while (!fifo_.empty() && !throttled_) {
      if (!indefinite_) {
        if (to_release_ == 0) {
          throttled_ = true;
          break;
        }
        to_release_--;
      }
      sent.push_back(fifo_.front());
      fifo_.pop_front();
    }
  }
  std::deque<uint64_t> fifo_;
  uint64_t current_epoch_ = 0, last_epoch_ = 0, to_release_ = 0;
  bool throttled_ = true, indefinite_ = false;  // plug_init starts throttled
};

TEST(netbuf_plug_schedule, OneCheckpointInFlightIsXenRemus) {
  FakePlugQdisc k;
  PlugSchedule s(&k);
  k.Send(1), k.Send(1);
  ASSERT_TRUE(s.Barrier(1).ok());
  k.Send(2);
  EXPECT_TRUE(k.sent.empty());
  ASSERT_TRUE(s.Release(1).ok());
  EXPECT_EQ(k.sent, (std::vector<uint64_t>{1, 1}));
  ASSERT_TRUE(s.Barrier(2).ok());
  ASSERT_TRUE(s.Release(2).ok());
  EXPECT_EQ(k.sent, (std::vector<uint64_t>{1, 1, 2}));
  EXPECT_EQ(k.log, "BRBR");
}

// What the kernel does with the naive schedule (BUFFER at every barrier,
// RELEASE_ONE at every ack) when two checkpoints are in flight: the second
// BUFFER overwrites the first section's count, and the first RELEASE_ONE
// lets an unacked epoch-2 packet out.
TEST(netbuf_plug_schedule, NaiveScheduleLeaksWithPipelinedCheckpoints) {
  FakePlugQdisc k;
  k.Send(1);
  ASSERT_TRUE(k.Buffer().ok());  // barrier 1: closed section = 1 packet
  k.Send(2), k.Send(2);
  ASSERT_TRUE(k.Buffer().ok());  // barrier 2: closed section count = 2, epoch 1's count lost
  ASSERT_TRUE(k.ReleaseOne().ok());  // ack 1 only
  EXPECT_EQ(k.sent, (std::vector<uint64_t>{1, 2}));  // epoch 2 left before its ack
}

TEST(netbuf_plug_schedule, PipelinedBarriersMergeIntoTheNextFreeSection) {
  FakePlugQdisc k;
  PlugSchedule s(&k);
  k.Send(1);
  ASSERT_TRUE(s.Barrier(1).ok());  // BUFFER: section <= 1
  k.Send(2), k.Send(2);
  ASSERT_TRUE(s.Barrier(2).ok());  // section busy: merged
  EXPECT_EQ(k.log, "B");
  EXPECT_EQ(s.closed_section(), 1u);
  ASSERT_TRUE(s.Release(1).ok());
  EXPECT_EQ(k.sent, (std::vector<uint64_t>{1}));
  k.Send(3);
  ASSERT_TRUE(s.Barrier(3).ok());  // BUFFER: section <= 3 (epochs 2 and 3)
  ASSERT_TRUE(s.Release(2).ok());  // not enough: the section holds epoch 3 too
  EXPECT_EQ(k.sent.size(), 1u);
  ASSERT_TRUE(s.Release(3).ok());
  EXPECT_EQ(k.sent, (std::vector<uint64_t>{1, 2, 2, 3}));
  EXPECT_EQ(k.log, "BRBR");
}

TEST(netbuf_plug_schedule, AckAheadOfItsBarrier) {
  FakePlugQdisc k;
  PlugSchedule s(&k);
  ASSERT_TRUE(s.Release(0).ok());
  k.Send(1);
  ASSERT_TRUE(s.Release(1).ok());
  EXPECT_TRUE(k.sent.empty());
  ASSERT_TRUE(s.Barrier(1).ok());  // BUFFER + RELEASE_ONE at once
  EXPECT_EQ(k.sent, (std::vector<uint64_t>{1}));
  EXPECT_EQ(s.closed_section(), std::nullopt);
}

TEST(netbuf_plug_schedule, DuplicateAndOlderAcksAreIgnored) {
  FakePlugQdisc k;
  PlugSchedule s(&k);
  ASSERT_TRUE(s.Barrier(1).ok());
  ASSERT_TRUE(s.Release(1).ok());
  ASSERT_TRUE(s.Barrier(2).ok());
  ASSERT_TRUE(s.Release(1).ok());
  ASSERT_TRUE(s.Release(0).ok());
  EXPECT_EQ(k.log, "BRB");
  ASSERT_TRUE(s.Release(2).ok());
  ASSERT_TRUE(s.Release(2).ok());
  EXPECT_EQ(k.log, "BRBR");
}

TEST(netbuf_plug_schedule, BarrierEpochsMustIncrease) {
  FakePlugQdisc k;
  PlugSchedule s(&k);
  ASSERT_TRUE(s.Barrier(3).ok());
  EXPECT_EQ(s.Barrier(3).code(), Code::kInvalidArgument);
  EXPECT_EQ(s.Barrier(2).code(), Code::kInvalidArgument);
  EXPECT_EQ(k.log, "B");
}

TEST(netbuf_plug_schedule, FinishReleaseIndefinitely) {
  FakePlugQdisc k;
  PlugSchedule s(&k);
  k.Send(1);
  ASSERT_TRUE(s.Barrier(1).ok());
  k.Send(2);
  ASSERT_TRUE(s.Finish(true).ok());
  EXPECT_EQ(k.sent, (std::vector<uint64_t>{1, 2}));
  k.Send(3);  // passes straight through now
  EXPECT_EQ(k.sent.size(), 3u);
  ASSERT_TRUE(s.Barrier(2).ok());
  ASSERT_TRUE(s.Release(2).ok());
  ASSERT_TRUE(s.Finish(false).ok());
  EXPECT_EQ(k.log, "BI");
}

TEST(netbuf_plug_schedule, FinishDropSendsNoCommand) {
  FakePlugQdisc k;
  PlugSchedule s(&k);
  k.Send(1);
  ASSERT_TRUE(s.Barrier(1).ok());
  ASSERT_TRUE(s.Finish(false).ok());
  EXPECT_EQ(k.log, "B");  // the backend deletes the IFB with its queue
  EXPECT_TRUE(k.sent.empty());
  EXPECT_EQ(k.held(), 1u);
}

// Random traffic, barriers and lagging/repeated/early acks: no packet leaves
// before its epoch is acked, order is kept, and once an epoch E is acked, the
// next barrier's ack lets everything up to E out (liveness).
TEST(netbuf_plug_schedule, RandomEpochsKeepOutputCommit) {
  std::mt19937 rng(7);
  FakePlugQdisc k;
  PlugSchedule s(&k);
  uint64_t open = 1, acked = 0, total = 0;
  for (int step = 0; step < 20000; step++) {
    switch (rng() % 4) {
      case 0:
      case 1:
        k.Send(open);
        total++;
        break;
      case 2: ASSERT_TRUE(s.Barrier(open++).ok()); break;
      case 3: {
        uint64_t e = open - 1 - std::min<uint64_t>(open - 1, rng() % 4);  // lagging acks
        if (rng() % 8 == 0) e = open;                                     // an ack ahead of its barrier
        ASSERT_TRUE(s.Release(e).ok());
        acked = std::max(acked, e);
        break;
      }
    }
    for (uint64_t e : k.sent) ASSERT_LE(e, acked);
  }
  for (size_t i = 1; i < k.sent.size(); i++) ASSERT_LE(k.sent[i - 1], k.sent[i]);
  // Liveness: ack everything, one more barrier and its ack release it all.
  ASSERT_TRUE(s.Release(open - 1).ok());
  ASSERT_TRUE(s.Barrier(open).ok());
  ASSERT_TRUE(s.Release(open).ok());
  EXPECT_EQ(k.sent.size(), total);
}

}  // namespace
}  // namespace remus::netbuf
