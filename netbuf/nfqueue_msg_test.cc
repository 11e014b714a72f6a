// The nfqueue netlink messages, checked attribute by attribute without a
// kernel, and the parser of what the kernel sends.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <libmnl/libmnl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>

#include <cstring>
#include <map>

#include "netbuf/nfqueue.h"

namespace remus::netbuf {
namespace {

std::map<int, const nlattr*> Attrs(const nlmsghdr* nlh) {
  std::map<int, const nlattr*> m;
  auto* tail = static_cast<const char*>(mnl_nlmsg_get_payload_tail(nlh));
  for (auto* a = static_cast<const nlattr*>(mnl_nlmsg_get_payload_offset(nlh, sizeof(nfgenmsg)));
       mnl_attr_ok(a, static_cast<int>(tail - reinterpret_cast<const char*>(a))); a = mnl_attr_next(a))
    m[mnl_attr_get_type(a)] = a;
  return m;
}

void ExpectHeader(const nlmsghdr* nlh, int msg, uint16_t queue) {
  EXPECT_EQ(nlh->nlmsg_type, (NFNL_SUBSYS_QUEUE << 8) | msg);
  auto* g = static_cast<const nfgenmsg*>(mnl_nlmsg_get_payload(nlh));
  EXPECT_EQ(g->version, NFNETLINK_V0);
  EXPECT_EQ(ntohs(g->res_id), queue);
}

TEST(netbuf_nfq_msg, BindAsksForAnAck) {
  char buf[kNfqMsgBufSize];
  nlmsghdr* nlh = BuildNfqBind(buf, 29007, 5);
  ExpectHeader(nlh, NFQNL_MSG_CONFIG, 29007);
  EXPECT_EQ(nlh->nlmsg_flags, NLM_F_REQUEST | NLM_F_ACK);
  EXPECT_EQ(nlh->nlmsg_seq, 5u);
  auto a = Attrs(nlh);
  ASSERT_TRUE(a.count(NFQA_CFG_CMD));
  auto* cmd = static_cast<const nfqnl_msg_config_cmd*>(mnl_attr_get_payload(a[NFQA_CFG_CMD]));
  EXPECT_EQ(cmd->command, NFQNL_CFG_CMD_BIND);
}

TEST(netbuf_nfq_msg, ParamsCopyMetadataOnlyAndFailClosedByDefault) {
  char buf[kNfqMsgBufSize];
  nlmsghdr* nlh = BuildNfqParams(buf, 7, 65536, false, 9);
  ExpectHeader(nlh, NFQNL_MSG_CONFIG, 7);
  auto a = Attrs(nlh);
  ASSERT_TRUE(a.count(NFQA_CFG_PARAMS) && a.count(NFQA_CFG_QUEUE_MAXLEN) && a.count(NFQA_CFG_FLAGS) &&
              a.count(NFQA_CFG_MASK));
  auto* p = static_cast<const nfqnl_msg_config_params*>(mnl_attr_get_payload(a[NFQA_CFG_PARAMS]));
  EXPECT_EQ(p->copy_mode, NFQNL_COPY_META);
  EXPECT_EQ(ntohl(mnl_attr_get_u32(a[NFQA_CFG_QUEUE_MAXLEN])), 65536u);
  uint32_t flags = ntohl(mnl_attr_get_u32(a[NFQA_CFG_FLAGS]));
  uint32_t mask = ntohl(mnl_attr_get_u32(a[NFQA_CFG_MASK]));
  EXPECT_EQ(flags & NFQA_CFG_F_FAIL_OPEN, 0u);
  EXPECT_NE(flags & NFQA_CFG_F_GSO, 0u);
  EXPECT_NE(mask & NFQA_CFG_F_FAIL_OPEN, 0u);  // so the kernel clears it

  nlh = BuildNfqParams(buf, 7, 100, true, 10);
  a = Attrs(nlh);
  EXPECT_NE(ntohl(mnl_attr_get_u32(a[NFQA_CFG_FLAGS])) & NFQA_CFG_F_FAIL_OPEN, 0u);
  EXPECT_EQ(ntohl(mnl_attr_get_u32(a[NFQA_CFG_QUEUE_MAXLEN])), 100u);
}

TEST(netbuf_nfq_msg, OneBatchVerdictCarriesTheLastId) {
  char buf[kNfqMsgBufSize];
  for (Verdict v : {Verdict::kAccept, Verdict::kDrop}) {
    nlmsghdr* nlh = BuildNfqVerdictBatch(buf, 29007, 0xfffffff0u, v);
    ExpectHeader(nlh, NFQNL_MSG_VERDICT_BATCH, 29007);
    EXPECT_EQ(nlh->nlmsg_flags & NLM_F_ACK, 0);  // errors still come back; acks would only add load
    auto a = Attrs(nlh);
    ASSERT_EQ(a.size(), 1u);
    ASSERT_TRUE(a.count(NFQA_VERDICT_HDR));
    auto* h = static_cast<const nfqnl_msg_verdict_hdr*>(mnl_attr_get_payload(a[NFQA_VERDICT_HDR]));
    EXPECT_EQ(ntohl(h->verdict), v == Verdict::kAccept ? NF_ACCEPT : NF_DROP);
    EXPECT_EQ(ntohl(h->id), 0xfffffff0u);
  }
}

// Two packet messages and an error, as one buffer.
TEST(netbuf_nfq_msg, ParsesPacketsAndErrors) {
  alignas(4) char buf[4096] = {};
  size_t off = 0;
  for (uint32_t id : {41u, 42u}) {
    nlmsghdr* nlh = mnl_nlmsg_put_header(buf + off);
    nlh->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET;
    auto* g = static_cast<nfgenmsg*>(mnl_nlmsg_put_extra_header(nlh, sizeof(nfgenmsg)));
    g->res_id = htons(7);
    nfqnl_msg_packet_hdr ph{};
    ph.packet_id = htonl(id);
    ph.hw_protocol = htons(0x0800);
    mnl_attr_put(nlh, NFQA_PACKET_HDR, sizeof ph, &ph);
    mnl_attr_put_u32(nlh, NFQA_IFINDEX_INDEV, htonl(3));
    off += nlh->nlmsg_len;
  }
  nlmsghdr* err = mnl_nlmsg_put_header(buf + off);
  err->nlmsg_type = NLMSG_ERROR;
  auto* e = static_cast<nlmsgerr*>(mnl_nlmsg_put_extra_header(err, sizeof(nlmsgerr)));
  e->error = -EBUSY;
  e->msg.nlmsg_seq = 12;
  off += err->nlmsg_len;

  NfqMessages m;
  ASSERT_TRUE(ParseNfqMessages(buf, off, &m).ok());
  EXPECT_EQ(m.ids, (std::vector<uint32_t>{41, 42}));
  ASSERT_EQ(m.errors.size(), 1u);
  EXPECT_EQ(m.errors[0].seq, 12u);
  EXPECT_EQ(m.errors[0].err, EBUSY);
}

TEST(netbuf_nfq_msg, APacketWithoutItsHeaderIsDataLoss) {
  alignas(4) char buf[256] = {};
  nlmsghdr* nlh = mnl_nlmsg_put_header(buf);
  nlh->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET;
  mnl_nlmsg_put_extra_header(nlh, sizeof(nfgenmsg));
  mnl_attr_put_u32(nlh, NFQA_MARK, 1);
  NfqMessages m;
  EXPECT_EQ(ParseNfqMessages(buf, nlh->nlmsg_len, &m).code(), Code::kDataLoss);
}

}  // namespace
}  // namespace remus::netbuf
