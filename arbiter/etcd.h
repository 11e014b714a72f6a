// The part of etcd's v3 API that arbitration needs (leases, one-key reads,
// transactions), as an interface: etcd::HttpClient (etcd_http.h) speaks it to a
// real cluster through etcd's JSON gateway; unit tests use a fake.
//
// Keys and values are raw bytes here; the client encodes them (base64) for
// the gateway. Revisions and lease ids are etcd's int64s.
//
// Errors: Unavailable when no endpoint answered within the deadline (the
// caller cannot tell whether a write took effect), NotFound for an unknown or
// expired lease where the API says so, InvalidArgument / Internal for
// answers etcd should never give.
//
// Thread-safety: implementations are safe to call from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/status.h"

namespace remus::etcd {

struct KeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;
  int64_t lease = 0;  // 0: not attached to a lease
};

// One comparison of a transaction (etcd's Compare, result EQUAL only).
struct Compare {
  enum class Target { kCreateRevision, kModRevision, kValue, kLease };
  std::string key;
  Target target = Target::kValue;
  // kValue: compared with value; the others with number. A create revision
  // of 0 means "the key does not exist".
  std::string value;
  int64_t number = 0;

  static Compare Absent(std::string k) { return {std::move(k), Target::kCreateRevision, {}, 0}; }
  static Compare ValueIs(std::string k, std::string v) { return {std::move(k), Target::kValue, std::move(v), 0}; }
  static Compare LeaseIs(std::string k, int64_t lease) { return {std::move(k), Target::kLease, {}, lease}; }
  static Compare ModRevisionIs(std::string k, int64_t rev) { return {std::move(k), Target::kModRevision, {}, rev}; }
};

// One operation of a transaction branch.
struct Op {
  enum class Kind { kPut, kDelete, kGet };
  Kind kind = Kind::kGet;
  std::string key;
  std::string value;  // kPut
  int64_t lease = 0;  // kPut: 0 = no lease

  static Op Put(std::string k, std::string v, int64_t lease = 0) { return {Kind::kPut, std::move(k), std::move(v), lease}; }
  static Op Delete(std::string k) { return {Kind::kDelete, std::move(k), {}, 0}; }
  static Op Get(std::string k) { return {Kind::kGet, std::move(k), {}, 0}; }
};

struct TxnRequest {
  std::vector<Compare> compare;  // all must hold
  std::vector<Op> success;
  std::vector<Op> failure;
};

struct TxnResult {
  bool succeeded = false;
  // The store's revision after the transaction (etcd's response header):
  // when succeeded with a write, the revision of that write.
  int64_t revision = 0;
  // One entry per kGet op of the branch that ran, in order: the key's value,
  // or nullopt when it does not exist.
  std::vector<std::optional<KeyValue>> gets;
};

class Kv {
 public:
  virtual ~Kv() = default;
  // A new lease of `ttl_seconds`; returns its id.
  virtual StatusOr<int64_t> Grant(int64_t ttl_seconds) = 0;
  // One keep-alive. Returns the TTL etcd now grants (seconds); 0 when the
  // lease has expired or was revoked (etcd answers a keep-alive of a dead
  // lease with TTL 0, not with an error).
  virtual StatusOr<int64_t> KeepAlive(int64_t lease) = 0;
  // Revokes the lease: its keys are deleted at once. OK if it was gone.
  virtual Status Revoke(int64_t lease) = 0;
  // Seconds the lease has left; -1 when it does not exist.
  virtual StatusOr<int64_t> TimeToLive(int64_t lease) = 0;
  // The key's current value, nullopt when it does not exist.
  virtual StatusOr<std::optional<KeyValue>> Get(const std::string& key) = 0;
  virtual StatusOr<TxnResult> Txn(const TxnRequest& txn) = 0;
};

}  // namespace remus::etcd
