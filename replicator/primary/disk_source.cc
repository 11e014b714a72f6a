#include "replicator/primary/disk_source.h"

#include <unistd.h>

#include <chrono>
#include <set>
#include <sstream>
#include <thread>

#include "common/io.h"
#include "common/log.h"

namespace remus {

using nlohmann::json;

json GuestDisk::ToJson() const { return wire::DiskSpecToJson(Spec()); }

StatusOr<GuestDisk> GuestDisk::FromJson(const json& j) {
  ASSIGN_OR_RETURN(wire::DiskSpec s, wire::DiskSpecFromJson(j));
  GuestDisk d;
  d.id = std::move(s.id);
  d.node = std::move(s.node);
  d.format = std::move(s.format);
  d.file = std::move(s.file);
  d.size = s.size;
  return d;
}

std::string QdevAlias(const std::string& qdev) {
  static const std::string kPeripheral = "/machine/peripheral/";
  if (qdev.rfind(kPeripheral, 0) == 0) {
    std::string rest = qdev.substr(kPeripheral.size());
    return rest.substr(0, rest.find('/'));
  }
  if (qdev.empty() || qdev[0] == '/') return "";  // a device without an id
  return qdev;
}

StatusOr<std::vector<GuestDisk>> ListGuestDisks(QemuMonitor* monitor, const std::string& domain,
                                                const std::string& select,
                                                const std::map<std::string, std::string>* libvirt_targets) {
  std::vector<GuestDisk> out;
  if (select == "none") return out;
  ASSIGN_OR_RETURN(json blocks, monitor->Execute("query-block"));
  const bool libvirt = libvirt_targets != nullptr;
  std::vector<std::string> present;
  std::vector<std::string> unnamed;  // disks remus cannot name (or restore)
  for (const auto& b : blocks) {
    if (!b.contains("inserted")) continue;  // an empty CD-ROM drive
    const json& ins = b["inserted"];
    if (ins.value("ro", false)) continue;
    GuestDisk d;
    d.id = b.value("device", "");
    d.device = d.id;
    d.node = ins.value("node-name", "");
    d.file = ins.value("file", "");
    d.format = ins.value("drv", "");
    if (ins.contains("image")) d.size = ins["image"].value("virtual-size", uint64_t{0});
    const std::string qdev = b.value("qdev", "");
    if (libvirt) {
      // libvirt attaches <disk>s with -blockdev: named by their target.
      auto it = d.id.empty() ? libvirt_targets->find(QdevAlias(qdev)) : libvirt_targets->end();
      if (it == libvirt_targets->end() || d.node.empty()) {
        unnamed.push_back(!d.id.empty() ? d.id : !qdev.empty() ? qdev : d.node);
        continue;
      }
      d.id = it->second;
      d.device = d.node;
    } else if (d.id.empty()) {
      unnamed.push_back(!qdev.empty() ? qdev : d.node);
      continue;
    }
    present.push_back(d.id);
    out.push_back(std::move(d));
  }
  if (!unnamed.empty() && select == "all") {
    std::string names;
    for (const auto& n : unnamed) names += (names.empty() ? "" : ", ") + n;
    if (libvirt)
      return FailedPrecondition("domain " + domain + " (libvirt): writable disk(s) " + names +
                                " are no <disk> of the domain XML (added with <qemu:commandline>?); the backup "
                                "restores from the XML and could not point them at its copy. Make them <disk> "
                                "elements, or name the disks to mirror with --disks (virsh domblklist), or use "
                                "--disks none with storage both hosts share");
    return FailedPrecondition("domain " + domain + ": disk(s) " + names +
                              " are attached with -blockdev; remus mirrors disks attached with -drive "
                              "(the backup rewrites -drive file= on failover). Use -drive, or "
                              "--disks none with storage both hosts share");
  }
  if (select == "all") return out;
  std::set<std::string> want;
  std::stringstream ss(select);
  for (std::string id; std::getline(ss, id, ',');)
    if (!id.empty()) want.insert(id);
  std::vector<GuestDisk> chosen;
  for (auto& d : out)
    if (want.erase(d.id)) chosen.push_back(std::move(d));
  if (!want.empty()) {
    std::string have;
    for (const auto& p : present) have += (have.empty() ? "" : ", ") + p;
    return InvalidArgument("domain " + domain + ": no writable disk '" + *want.begin() + "'; the guest's writable " +
                           (libvirt ? "disks (virsh domblklist) are: " : "-drive disks are: ") +
                           (have.empty() ? "(none)" : have));
  }
  return chosen;
}

// Hands the mirror's writes to the replicator.
class DiskSource::Sink final : public DiskSink {
 public:
  Sink(uint32_t index, DiskSource::WriteFn* write) : index_(index), write_(write) {}
  Status Read(uint64_t, std::span<uint8_t>) override {
    return Unimplemented("the mirror target is write-only");
  }
  Status Write(uint64_t off, std::span<const uint8_t> data, bool) override {
    (*write_)(index_, wire::DiskOp::kWrite, off, data.size(), data);
    return OkStatus();
  }
  Status WriteZeroes(uint64_t off, uint64_t len, bool) override {
    (*write_)(index_, wire::DiskOp::kZero, off, len, {});
    return OkStatus();
  }
  Status Trim(uint64_t off, uint64_t len) override {
    (*write_)(index_, wire::DiskOp::kTrim, off, len, {});
    return OkStatus();
  }
  // Durability on the backup comes with the checkpoint's commit, not with
  // the guest's flushes (which QEMU sends to the guest's own disk).
  Status Flush() override { return OkStatus(); }

 private:
  uint32_t index_;
  DiskSource::WriteFn* write_;
};

DiskSource::DiskSource(QemuMonitor* monitor, std::string domain, std::string run_dir, std::vector<GuestDisk> disks,
                       WriteFn write, PassFdFn pass_fd)
    : monitor_(monitor),
      domain_(std::move(domain)),
      run_dir_(std::move(run_dir)),
      tag_("disk[" + domain_ + "]"),
      disks_(std::move(disks)),
      write_(std::move(write)),
      pass_fd_(std::move(pass_fd)),
      added_(disks_.size(), false),
      mirroring_(disks_.size(), false),
      ready_(disks_.size(), false) {}

DiskSource::~DiskSource() { Stop(false); }

Status DiskSource::Start() {
  for (size_t i = 0; i < disks_.size(); i++) {
    const GuestDisk& d = disks_[i];
    if (d.size == 0 || d.size % 512 != 0)
      return FailedPrecondition("domain " + domain_ + ": disk " + d.id + " has size " + std::to_string(d.size) +
                                ", not a multiple of 512");
    sinks_.push_back(std::make_unique<Sink>(static_cast<uint32_t>(i), &write_));
    NbdExport exp;
    exp.name = d.id;
    exp.description = "remus mirror of " + domain_ + "/" + d.id;
    exp.size = d.size;
    exp.min_block = 1;
    exp.max_payload = wire::kMaxDiskWrite;
    NbdServerOptions so;
    so.unix_path = run_dir_ + "/" + domain_ + "." + d.id + ".nbd";
    so.tag = "nbd[" + domain_ + "/" + d.id + "]";
    ::unlink(so.unix_path.c_str());
    ASSIGN_OR_RETURN(auto server, NbdServer::Start(exp, sinks_.back().get(), so));
    servers_.push_back(std::move(server));
    json address = {{"type", "unix"}, {"path", so.unix_path}};
    if (pass_fd_) {
      // QEMU connects through a socket we connected for it: libvirt's QEMU
      // may not be allowed to open our path (its own user, AppArmor).
      const std::string fdname = NodeName(i);
      ASSIGN_OR_RETURN(Fd conn, ConnectUnix(so.unix_path));
      RETURN_IF_ERROR(pass_fd_(fdname, conn.get())
                          .Annotate("domain " + domain_ + ": handing QEMU the mirror connection of disk " + d.id));
      address = {{"type", "fd"}, {"str", fdname}};
    }
    Status added = monitor_
                       ->Execute("blockdev-add", {{"driver", "nbd"},
                                                  {"node-name", NodeName(i)},
                                                  {"server", address},
                                                  {"export", d.id}})
                       .status();
    if (!added.ok()) {
      if (pass_fd_) (void)monitor_->Execute("closefd", {{"fdname", NodeName(i)}});
      return added.Annotate("domain " + domain_ + ": adding the mirror target for disk " + d.id);
    }
    added_[i] = true;
    RETURN_IF_ERROR(monitor_
                        ->Execute("blockdev-mirror", {{"job-id", JobId(i)},
                                                      {"device", d.device.empty() ? d.id : d.device},
                                                      {"target", NodeName(i)},
                                                      {"sync", "full"},
                                                      {"copy-mode", "write-blocking"},
                                                      {"auto-finalize", true},
                                                      {"auto-dismiss", true}})
                        .status()
                        .Annotate("domain " + domain_ + ": starting the mirror of disk " + d.id));
    mirroring_[i] = true;
    LOG_INFO(tag_) << "mirroring disk " << d.id << " (" << d.format << ", " << d.size << " bytes, " << d.file
                   << ") through " << so.unix_path;
  }
  return OkStatus();
}

void DiskSource::OnEvent(const json& ev) {
  const std::string name = ev.value("event", "");
  if (name.rfind("BLOCK_JOB_", 0) != 0) return;
  const json& data = ev.contains("data") ? ev["data"] : json::object();
  const std::string job = data.value("device", data.value("id", ""));
  MutexLock g(mu_);
  for (size_t i = 0; i < disks_.size(); i++) {
    if (job != JobId(i)) continue;
    if (name == "BLOCK_JOB_READY") {
      if (!ready_[i]) LOG_INFO(tag_) << "disk " << disks_[i].id << ": copy complete, mirroring every write";
      ready_[i] = true;
    } else if (name == "BLOCK_JOB_ERROR" || ((name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED") &&
                                             !stopping_)) {
      std::string why = name + (data.contains("error") ? ": " + data.value("error", "") : std::string());
      if (failure_.ok()) failure_ = Unavailable("disk " + disks_[i].id + ": mirror job ended (" + why + ")");
      LOG_ERROR(tag_) << failure_.message();
    }
  }
}

bool DiskSource::AllReady() const {
  MutexLock g(mu_);
  for (bool r : ready_)
    if (!r) return false;
  return true;
}

Status DiskSource::failure() const {
  MutexLock g(mu_);
  return failure_;
}

json DiskSource::Progress() const {
  json out = json::array();
  std::map<std::string, std::pair<uint64_t, uint64_t>> jobs;
  if (auto q = monitor_->Execute("query-block-jobs", json::object(), 2000); q.ok()) {
    for (const auto& j : *q) jobs[j.value("device", "")] = {j.value("offset", uint64_t{0}), j.value("len", uint64_t{0})};
  }
  MutexLock g(mu_);
  uint64_t done = 0, total = 0;
  for (size_t i = 0; i < disks_.size(); i++) {
    auto it = jobs.find(JobId(i));
    uint64_t off = it != jobs.end() ? it->second.first : 0;
    uint64_t len = it != jobs.end() ? it->second.second : disks_[i].size;
    if (ready_[i]) off = len;
    done += off;
    total += len;
    out.push_back({{"id", disks_[i].id}, {"copied_bytes", off}, {"total_bytes", len}, {"ready", bool(ready_[i])}});
  }
  fraction_ = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
  return out;
}

double DiskSource::Fraction() const {
  MutexLock g(mu_);
  return fraction_;
}

void DiskSource::Stop(bool qemu_alive) {
  {
    MutexLock g(mu_);
    stopping_ = true;
  }
  for (size_t i = 0; i < disks_.size(); i++) {
    if (qemu_alive && mirroring_[i]) {
      // A ready job would pivot on block-job-complete; cancel leaves the
      // guest on its own disk, which is what ending protection means.
      Status s = monitor_->Execute("block-job-cancel", {{"device", JobId(i)}, {"force", true}}, 5000).status();
      if (!s.ok() && s.code() != Code::kInvalidArgument) LOG_WARN(tag_) << "cancelling " << JobId(i) << ": " << s.ToString();
      for (int k = 0; k < 250; k++) {  // wait until the job is gone (it holds the target node)
        auto q = monitor_->Execute("query-block-jobs", json::object(), 2000);
        if (!q.ok()) break;
        bool found = false;
        for (const auto& j : *q) found |= j.value("device", "") == JobId(i);
        if (!found) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    mirroring_[i] = false;
    if (qemu_alive && added_[i]) {
      Status s = monitor_->Execute("blockdev-del", {{"node-name", NodeName(i)}}, 5000).status();
      if (!s.ok()) LOG_WARN(tag_) << "removing " << NodeName(i) << ": " << s.ToString();
    }
    added_[i] = false;
  }
  for (auto& s : servers_) s->Stop();
  for (auto& s : servers_) ::unlink(s->unix_path().c_str());
  servers_.clear();
}

}  // namespace remus
