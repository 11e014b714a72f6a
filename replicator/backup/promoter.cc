#include "replicator/backup/promoter.h"

#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <thread>
#include <vector>

#include "common/io.h"
#include "common/log.h"
#include "replicator/libvirt/restore.h"
#include "replicator/qemu/argv_rewrite.h"
#include "replicator/qemu/qmp.h"

namespace remus {

using nlohmann::json;

namespace {
void SetPhase(const RestoreRequest& r, const char* p) {
  if (r.phase) *r.phase = p;
}

RamMappingPlan PlanFor(const wire::ConfigMsg& config, const PageStore& store, bool map_ram) {
  RamMappingPlan plan;
  if (!map_ram) plan.reason = "restore by mapping is off (remusd --restore stream)";
  else if (config.libvirt)
    plan.reason = "libvirt mode: libvirt cannot back a domain's memory with a given file, so the checkpoint is streamed";
  else plan = PlanRamMapping(config.argv, store.blocks());
  return plan;
}
}  // namespace

RestorePlanInfo PlanRestore(const wire::ConfigMsg& config, const PageStore& store, bool map_ram) {
  RamMappingPlan plan = PlanFor(config, store, map_ram);
  RestorePlanInfo info;
  info.mode = plan.map ? "mapped" : "streamed";
  info.reason = plan.reason;
  for (size_t b = 0; b < store.blocks().size(); b++) {
    if (plan.map && b == plan.block) info.mapped_bytes += store.blocks()[b].used_length;
    else info.streamed_ram_bytes += store.blocks()[b].used_length;
  }
  return info;
}

StatusOr<RestoredGuest> QemuPromoter::Restore(const RestoreRequest& req) {
  const std::string tag = "backup[" + req.domain + "]";
  RamMappingPlan plan = PlanFor(req.config, *req.store, req.map_ram);
  if (plan.map) {
    bool exited_at_start = false;
    StatusOr<RestoredGuest> g = Attempt(req, plan, &exited_at_start);
    // A QEMU that refuses the mapping (an old machine type, a backend it
    // cannot open) exits at start: stream instead. Nothing ran, and the
    // mapping is private anyway, so the store still holds the checkpoint.
    // Other failures are the promotion's, as with streaming.
    if (g.ok() || !exited_at_start) return g;
    LOG_WARN(tag) << "restore by mapping failed (" << g.status().message() << "); streaming the checkpoint instead";
    plan = RamMappingPlan{};
    plan.reason = "restore by mapping failed: " + g.status().message();
  } else {
    LOG_INFO(tag) << "streaming the whole checkpoint: " << plan.reason;
  }
  return Attempt(req, plan, nullptr);
}

StatusOr<RestoredGuest> QemuPromoter::Attempt(const RestoreRequest& req, const RamMappingPlan& plan,
                                              bool* exited_at_start) {
  const std::string tag = "backup[" + req.domain + "]";
  const std::string& run = req.run_dir;
  const auto& blocks = req.store->blocks();
  std::vector<std::string> argv = req.config.argv;
  for (std::string f : {std::string(kRestoredQmpSocket), std::string(kRestoredRemusdQmpSocket),
                        std::string("incoming.sock"), std::string("qemu.pid")})
    ::unlink((run + "/" + f).c_str());
  argv = RewriteArgvForRestore(argv, run, opts_.qemu_binary, req.drive_images);
  std::vector<bool> mapped;
  if (plan.map) {
    argv = AddMappedRam(argv, plan.id, req.store->BlockPath(plan.block), blocks[plan.block].used_length);
    mapped.assign(blocks.size(), false);
    mapped[plan.block] = true;
  }
  LOG_INFO(tag) << "restoring epoch " << req.epoch << " into a new QEMU"
                << (plan.map ? " that maps " + plan.id + " from the page store" : std::string());
  std::string log = run + "/qemu.log";
  SetPhase(req, "starting QEMU");
  ASSIGN_OR_RETURN(int pid, launcher_->Spawn({argv, log}));
  if (req.started) req.started(pid);
  // Whatever fails from here on, this attempt's QEMU is killed and reaped: a
  // retry must not meet a half-started copy.
  auto fail = [&](Status s) -> StatusOr<RestoredGuest> {
    Status k = launcher_->Kill(pid);
    if (!k.ok()) LOG_ERROR(tag) << "cannot stop the failed attempt's QEMU: " << k.ToString();
    return s;
  };
  auto qemu_failed = [&](const std::string& what) {
    auto tail = ReadFileToString(log);
    std::string t = tail.ok() ? *tail : "";
    if (t.size() > 600) t = t.substr(t.size() - 600);
    return fail(Unavailable(what + "; QEMU's log " + log + " ends with: " + t));
  };
  // remusd's own monitor: the operators' stays free for them.
  const std::string qmp_path = run + "/" + kRestoredRemusdQmpSocket;
  std::unique_ptr<QmpClient> qmp;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(opts_.start_timeout_ms);
  while (!qmp) {
    if (!launcher_->Running(pid)) {
      if (exited_at_start) *exited_at_start = true;
      return qemu_failed("the restored QEMU exited at start");
    }
    if (std::chrono::steady_clock::now() > deadline) return qemu_failed("the restored QEMU's monitor did not come up");
    auto c = QmpClient::Connect(qmp_path, 2000);
    if (c.ok()) qmp = std::move(c).value();
    else std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::string in_path = run + "/incoming.sock";
  auto mi = qmp->Execute("migrate-incoming", {{"uri", "unix:" + in_path}});
  if (!mi.ok()) return fail(mi.status().Annotate("migrate-incoming"));
  Fd fd;
  for (int i = 0; i < 500 && !fd.valid(); i++) {
    auto c = ConnectUnix(in_path);
    if (c.ok()) fd = std::move(c).value();
    else std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!fd.valid()) return qemu_failed("the restored QEMU did not open its incoming socket");
  RestoreStats rs;
  rs.progress = req.progress;
  SetPhase(req, plan.map ? "loading the device state (RAM mapped)" : "streaming the checkpoint");
  Status ws = WriteRestoreStream(*req.store, req.configuration, fd.get(), &rs, mapped);
  if (!ws.ok()) return fail(ws.Annotate("restore stream"));
  ::shutdown(fd.get(), SHUT_WR);
  SetPhase(req, "waiting for the guest to run");
  for (int i = 0; i < 3000; i++) {
    auto st = qmp->Execute("query-status", json::object(), 2000);
    if (!st.ok()) return qemu_failed("the restored QEMU failed while loading: " + st.status().message());
    if (st->is_object() && st->value("status", "") == "running") {
      LOG_INFO(tag) << "restored " << rs.pages << " pages + " << rs.zero_pages << " zero pages"
                    << (plan.map ? ", " + std::to_string(rs.mapped_bytes) + " bytes mapped" : std::string())
                    << "; guest running (pid " << pid << ", QMP " << qmp_path << ")";
      RestoredGuest g;
      g.pid = pid;
      g.ours = true;
      g.qmp_socket = run + "/" + kRestoredQmpSocket;
      g.remus_qmp_socket = qmp_path;
      g.restore_mode = plan.map ? "mapped" : "streamed";
      g.stream_reason = plan.reason;
      g.streamed_bytes = rs.bytes;
      g.mapped_bytes = rs.mapped_bytes;
      return g;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return qemu_failed("the restored guest did not start running");
}

StatusOr<RestoredGuest> LibvirtPromoter::Restore(const RestoreRequest& req) {
  const std::string tag = "backup[" + req.domain + "]";
  std::string xml_in = req.config.libvirt ? req.config.libvirt->xml : "";
  auto rewritten = RewriteDomainXmlForRestore(xml_in, req.run_dir, opts_.qemu_binary, req.drive_images);
  if (!rewritten.ok())
    return Status(rewritten.status().code(), "domain " + req.domain + ": cannot make its libvirt XML fit this host: " +
                                                 rewritten.status().message());
  std::string xml = std::move(rewritten).value();
  Status w = WriteFileAtomic(req.run_dir + "/domain.xml", xml);  // for the operator: what was restored
  if (!w.ok()) LOG_WARN(tag) << "cannot keep the restored XML: " << w.ToString();
  LOG_INFO(tag) << "restoring epoch " << req.epoch << " through libvirt at " << opts_.uri;
  LibvirtRestoreOptions ro;
  ro.uri = opts_.uri;
  ro.work_dir = req.run_dir;
  ro.pid_dir = opts_.pid_dir;
  RestoreStats rs;
  rs.progress = req.progress;
  SetPhase(req, "libvirt starting QEMU");
  auto res = RestoreDomain(ro, xml, [&](int fd) {
    SetPhase(req, "streaming the checkpoint");
    Status st = WriteRestoreStream(*req.store, req.configuration, fd, &rs).Annotate("restore stream");
    SetPhase(req, "libvirt resuming the guest");
    return st;
  });
  if (!res.ok()) return res.status();
  LOG_INFO(tag) << "restored " << rs.pages << " pages + " << rs.zero_pages << " zero pages; domain " << res->domain
                << " runs in libvirt " << opts_.uri << " (pid " << res->qemu_pid << ", libvirt restore "
                << res->restore_ms << " ms)";
  RestoredGuest g;
  g.pid = res->qemu_pid;
  g.ours = false;
  g.restore_mode = "streamed";
  g.stream_reason = PlanFor(req.config, *req.store, req.map_ram).reason;
  g.streamed_bytes = rs.bytes;
  g.libvirt_uri = opts_.uri;
  g.libvirt_domain = res->domain;
  return g;
}

}  // namespace remus
