#!/bin/bash
# PID 1 of L1 (the emulated KVM host of the virtual lab), started by l1-initramfs-init
# after switch_root onto the outer machine's root filesystem (read-only 9p under a tmpfs
# overlay). It:
#   1. mounts tmpfs/devpts/tracefs and the writable 9p share "lab" (L0's work directory),
#      bind-mounts the kernel's modules from the share onto /lib/modules/<version>;
#   2. loads irqbypass, kvm, kvm_amd, vfio-pci and binds the assigned NIC to vfio-pci;
#   3. records a host fixture of L1 (out/l1-host/) for the host preflight tests;
#   4. defines tracefs kprobe events on the IRQ bypass manager and enables KVM/irq events;
#   5. runs L2 twice (KVM irqfd path, then x-no-kvm-msix=on), recording trace, L1
#      /proc/interrupts before/during/after, L2's console, dmesg;
#   6. copies out/ to the share and powers off.
# Kernel args read here: lab.bdf= lab.mac= lab.pings= lab.runs=name:extra,...
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C

up() { local u _; read -r u _ < /proc/uptime; echo "$u"; }
say() { echo "lab-l1: $* t=$(up)"; }
finish() {
    say "poweroff"
    sync
    echo 1 > /proc/sys/kernel/sysrq
    echo o > /proc/sysrq-trigger
    sleep 10 2>/dev/null  # the 9p root may already be gone
}

say "start $(uname -r)"
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm /run/lab
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 lab /run/lab || { say "cannot mount lab share"; finish; }
LAB=/run/lab
ver=$(uname -r)
mkdir -p "/lib/modules/$ver"
mount --bind "$LAB/kernel/lib/modules/$ver" "/lib/modules/$ver" || { say "no modules for $ver"; finish; }

BDF=0000:00:05.0
MAC=
PINGS=200
RUNS="irqfd:,no-kvm-msix:x-no-kvm-msix=on"
for word in $(cat /proc/cmdline); do
    case "$word" in
        lab.bdf=*) BDF="${word#lab.bdf=}" ;;
        lab.mac=*) MAC="${word#lab.mac=}" ;;
        lab.pings=*) PINGS="${word#lab.pings=}" ;;
        lab.runs=*) RUNS="${word#lab.runs=}" ;;
    esac
done

OUT=/tmp/out
mkdir -p "$OUT"
{
    echo "uname -r: $ver"
    echo "uname -a: $(uname -a)"
    echo "cmdline: $(cat /proc/cmdline)"
    echo "qemu: $(qemu-system-x86_64 --version | head -1)"
} > "$OUT/l1-info.txt"

# ---- 2. modules and VFIO binding --------------------------------------------------------
: > "$OUT/l1-setup.log"
for mod in irqbypass kvm kvm_amd vfio-pci; do
    if modprobe "$mod" >> "$OUT/l1-setup.log" 2>&1; then
        echo "modprobe $mod: ok" >> "$OUT/l1-setup.log"
    else
        echo "modprobe $mod: FAILED" >> "$OUT/l1-setup.log"
    fi
done
dev=/sys/bus/pci/devices/$BDF
echo "$BDF before: driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)" >> "$OUT/l1-setup.log"
[ -e "$dev/driver" ] && echo "$BDF" > "$dev/driver/unbind"
echo vfio-pci > "$dev/driver_override"
echo "$BDF" > /sys/bus/pci/drivers_probe
echo "$BDF after: driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)" >> "$OUT/l1-setup.log"
ls -l /dev/kvm /dev/vfio/ >> "$OUT/l1-setup.log" 2>&1
say "modules loaded, $BDF -> $(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)"

# ---- 3. host fixture of L1 ---------------------------------------------------------------
H=$OUT/l1-host
mkdir -p "$H/proc"
cat /proc/cmdline > "$H/proc/cmdline"
cat /proc/interrupts > "$H/proc/interrupts"
cat /proc/modules > "$H/proc/modules"
cat /proc/cpuinfo > "$H/proc/cpuinfo"
uname -r > "$H/uname-r.txt"
dmesg > "$H/dmesg.txt"
cut -d' ' -f1 /proc/modules | sort > "$H/modules.txt"
ls -l /dev/kvm /dev/vfio/ > "$H/dev-kvm-vfio.txt" 2>&1
: > "$H/symlinks.txt"
copy_file() {  # copy_file SRC: regular file into the mirror tree, keeping its path
    # bash builtins only: every fork costs tens of ms in L1 under TCG
    local src=$1 v=
    [ -f "$src" ] || return 0
    [ -d "$H${src%/*}" ] || mkdir -p "$H${src%/*}"
    IFS= read -r -d '' v 2> /tmp/copy-err < "$src"  # status 1 at EOF: no NUL in the file
    if [ -s /tmp/copy-err ]; then
        echo "unreadable: $src: $(< /tmp/copy-err)" >> "$H/unreadable.txt"
    else
        printf '%s' "$v" > "$H$src"
    fi
}
for iommu in /sys/class/iommu/*; do
    [ -e "$iommu" ] || continue
    echo "$iommu -> $(readlink "$iommu")" >> "$H/symlinks.txt"
    ls -l "$iommu"/ "$iommu"/*-iommu/ >> "$H/iommu-sysfs-ls.txt" 2>&1
    for f in "$iommu"/intel-iommu/* "$iommu"/amd-iommu/*; do
        copy_file "$f"
    done
done
: > "$H/iommu_groups.txt"
for g in /sys/kernel/iommu_groups/*; do
    copy_file "$g/type"
    copy_file "$g/reserved_regions"
    for d in "$g"/devices/*; do
        [ -e "$d" ] && echo "${g##*/} ${d##*/}" >> "$H/iommu_groups.txt"
    done
done
sort -n -o "$H/iommu_groups.txt" "$H/iommu_groups.txt"
: > "$H/pci_devices.txt"
for d in /sys/bus/pci/devices/*; do
    bdf=${d##*/}
    for f in vendor device class subsystem_vendor subsystem_device revision irq driver_override; do
        copy_file "$d/$f"
    done
    drv=-
    grp=-
    if [ -L "$d/driver" ]; then
        link=$(readlink "$d/driver")
        drv=${link##*/}
        echo "$d/driver -> $link" >> "$H/symlinks.txt"
    fi
    if [ -L "$d/iommu_group" ]; then
        link=$(readlink "$d/iommu_group")
        grp=${link##*/}
        echo "$d/iommu_group -> $link" >> "$H/symlinks.txt"
    fi
    msi=
    if [ -d "$d/msi_irqs" ]; then
        mkdir -p "$H$d/msi_irqs"
        for m in "$d"/msi_irqs/*; do
            [ -e "$m" ] || continue
            copy_file "$m"
            read -r mode < "$m"
            msi="$msi${msi:+,}${m##*/}:$mode"
        done
    fi
    read -r vendor < "$d/vendor"
    read -r device < "$d/device"
    read -r class < "$d/class"
    echo "$bdf vendor=$vendor device=$device class=$class driver=$drv iommu_group=$grp msi_irqs=${msi:--}" >> "$H/pci_devices.txt"
done
if command -v lspci > /dev/null; then
    lspci -vvv -nn -D > "$H/lspci-vvv.txt" 2>&1
    lspci -k -nn -D > "$H/lspci-k.txt" 2>&1
fi
for m in kvm kvm_amd vfio vfio_pci vfio_pci_core vfio_iommu_type1 irqbypass; do
    for f in /sys/module/$m/parameters/*; do
        copy_file "$f"
    done
done
say "host fixture recorded"

# ---- 4. tracefs: kprobe events and tracepoints ----------------------------------------------
T=/sys/kernel/tracing
echo 0 > $T/tracing_on
echo > $T/trace
echo 4096 > $T/buffer_size_kb
echo > $T/kprobe_events
# "module function definition": each definition is tried; the outcome goes to kprobes.txt.
PROBES=(
    "irqbypass irq_bypass_register_producer p:irqbp/prod irqbypass:irq_bypass_register_producer prod=\$arg1:x64 token=+16(\$arg1):x64 irq=+24(\$arg1):s32"
    "irqbypass irq_bypass_register_producer r:irqbp/prod_ret irqbypass:irq_bypass_register_producer ret=\$retval:s32"
    "irqbypass irq_bypass_register_consumer p:irqbp/cons irqbypass:irq_bypass_register_consumer cons=\$arg1:x64 token=+16(\$arg1):x64"
    "irqbypass irq_bypass_register_consumer r:irqbp/cons_ret irqbypass:irq_bypass_register_consumer ret=\$retval:s32"
    "irqbypass irq_bypass_unregister_producer p:irqbp/unprod irqbypass:irq_bypass_unregister_producer prod=\$arg1:x64 token=+16(\$arg1):x64 irq=+24(\$arg1):s32"
    "irqbypass irq_bypass_unregister_consumer p:irqbp/uncons irqbypass:irq_bypass_unregister_consumer cons=\$arg1:x64 token=+16(\$arg1):x64"
    "kvm kvm_arch_irq_bypass_add_producer p:irqbp/connect kvm:kvm_arch_irq_bypass_add_producer cons=\$arg1:x64 ctoken=+16(\$arg1):x64 prod=\$arg2:x64 ptoken=+16(\$arg2):x64 irq=+24(\$arg2):s32"
    "kvm kvm_arch_irq_bypass_add_producer r:irqbp/connect_ret kvm:kvm_arch_irq_bypass_add_producer ret=\$retval:s32"
    "kvm kvm_arch_irq_bypass_del_producer p:irqbp/disconnect kvm:kvm_arch_irq_bypass_del_producer cons=\$arg1:x64 ctoken=+16(\$arg1):x64 prod=\$arg2:x64 ptoken=+16(\$arg2):x64 irq=+24(\$arg2):s32"
    "kvm kvm_arch_update_irqfd_routing p:irqbp/upd_routing kvm:kvm_arch_update_irqfd_routing host_irq=\$arg2:u32 gsi=\$arg3:u32 set=\$arg4:u8"
    "kvm_amd avic_pi_update_irte p:irqbp/avic_pi kvm_amd:avic_pi_update_irte host_irq=\$arg2:u32 gsi=\$arg3:u32 set=\$arg4:u8"
    "kvm_amd avic_pi_update_irte r:irqbp/avic_pi_ret kvm_amd:avic_pi_update_irte ret=\$retval:s32"
    "kvm kvm_irqfd p:irqbp/kvm_irqfd kvm:kvm_irqfd fd=+0(\$arg2):s32 gsi=+4(\$arg2):u32 flags=+8(\$arg2):x32 resamplefd=+12(\$arg2):s32"
    "kvm kvm_irqfd r:irqbp/kvm_irqfd_ret kvm:kvm_irqfd ret=\$retval:s32"
    "kvm kvm_irqfd_assign p:irqbp/kvm_irqfd_assign kvm:kvm_irqfd_assign fd=+0(\$arg2):s32 gsi=+4(\$arg2):u32 flags=+8(\$arg2):x32"
    "kvm irqfd_shutdown p:irqbp/irqfd_shutdown kvm:irqfd_shutdown work=\$arg1:x64"
    "vfio_pci_core vfio_pci_set_irqs_ioctl p:irqbp/vfio_set vfio_pci_core:vfio_pci_set_irqs_ioctl flags=\$arg2:x32 index=\$arg3:u32 start=\$arg4:u32 count=\$arg5:u32 fd0=+0(\$arg6):s32"
    "vfio_pci_core vfio_pci_set_irqs_ioctl r:irqbp/vfio_set_ret vfio_pci_core:vfio_pci_set_irqs_ioctl ret=\$retval:s32"
    "vfio_pci_core vfio_msi_set_vector_signal p:irqbp/vfio_vec vfio_pci_core:vfio_msi_set_vector_signal vector=\$arg2:s32 fd=\$arg3:s32 msix=\$arg4:u8"
    "vfio_pci_core vfio_msi_set_block p:irqbp/vfio_block vfio_pci_core:vfio_msi_set_block start=\$arg2:u32 count=\$arg3:u32 fd0=+0(\$arg4):s32 msix=\$arg5:u8"
)
FUNCS="irq_bypass_register_producer irq_bypass_register_consumer
    irq_bypass_unregister_producer irq_bypass_unregister_consumer
    kvm_arch_irq_bypass_add_producer kvm_arch_irq_bypass_del_producer
    kvm_arch_irq_bypass_stop kvm_arch_irq_bypass_start kvm_arch_has_irq_bypass
    kvm_arch_update_irqfd_routing avic_pi_update_irte vmx_pi_update_irte
    kvm_irqfd kvm_irqfd_assign kvm_irqfd_deassign irqfd_shutdown irqfd_inject irqfd_wakeup
    kvm_set_msi kvm_send_userspace_msi
    vfio_pci_set_irqs_ioctl vfio_msi_set_vector_signal vfio_msi_set_block vfio_msihandler
    vfio_msi_enable vfio_msi_disable"
printf '%s\n' $FUNCS > /tmp/funcs.txt
# available_filter_functions: "name [module]"; /proc/kallsyms: "addr type name\t[module]"
awk 'NR == FNR { want[$1] = 1; next } ($1 in want) && !seen[$1]++ { print $1, $2 }' \
    /tmp/funcs.txt $T/available_filter_functions > /tmp/aff.txt
awk 'NR == FNR { want[$1] = 1; next } ($3 in want) && !seen[$3]++ { print $3, $2, $4 }' \
    /tmp/funcs.txt /proc/kallsyms > /tmp/ksyms.txt
{
    echo "# function | in available_filter_functions (ftrace-able) | in /proc/kallsyms: type module"
    echo "# (absent from both = inlined or not built; kallsyms type t = static, T = global)"
    for fn in $FUNCS; do
        aff=$(grep -m1 "^$fn " /tmp/aff.txt)
        ks=$(grep -m1 "^$fn " /tmp/ksyms.txt)
        [ -n "$aff" ] && aff="yes ${aff#* }" || aff=no
        [ -n "$ks" ] && ks="${ks#* }" || ks=no
        echo "$fn | filter: $aff | kallsyms: $ks"
    done
} > "$OUT/probeable.txt"
: > "$OUT/kprobes.txt"
for entry in "${PROBES[@]}"; do
    read -r mod fn def <<< "$entry"
    echo > $T/error_log 2>/dev/null
    if echo "$def" >> $T/kprobe_events 2>/dev/null; then
        echo "ok     $def" >> "$OUT/kprobes.txt"
    else
        echo "FAILED $def" >> "$OUT/kprobes.txt"
        sed 's/^/       # /' $T/error_log >> "$OUT/kprobes.txt" 2>/dev/null
    fi
done
cat $T/kprobe_events > "$OUT/kprobe_events.txt"
echo 1 > $T/events/irqbp/enable
: > "$OUT/events.txt"
mkdir -p "$OUT/formats"
for ev in kvm/kvm_pi_irte_update kvm/kvm_msi_set_irq kvm/kvm_set_irq irq/irq_handler_entry; do
    if [ -d "$T/events/$ev" ]; then
        case "$ev" in
            # only the vfio-msix/vfio-intx host handlers
            irq/irq_handler_entry) echo 'name ~ "vfio*"' > "$T/events/$ev/filter" ;;
            # drop L2's PIT (gsi 0) and COM1 console (gsi 4) line changes: ~13000 per run
            kvm/kvm_set_irq) echo 'gsi != 0 && gsi != 4' > "$T/events/$ev/filter" ;;
        esac
        echo 1 > "$T/events/$ev/enable"
        read -r filter < "$T/events/$ev/filter"
        echo "enabled $ev filter: $filter" >> "$OUT/events.txt"
        cat "$T/events/$ev/format" > "$OUT/formats/${ev//\//-}.txt"
    else
        echo "missing $ev" >> "$OUT/events.txt"
    fi
done
for ev in "$T"/events/irqbp/*/format; do
    n=${ev%/format}
    cat "$ev" > "$OUT/formats/irqbp-${n##*/}.txt"
done
say "tracing set up: $(grep -c '^ok' "$OUT/kprobes.txt") kprobes ok, $(grep -c '^FAILED' "$OUT/kprobes.txt") failed"

# ---- 5. the L2 runs ---------------------------------------------------------------------------
stamp() {  # prefix each line with L1's uptime
    local line u _
    while IFS= read -r line; do
        read -r u _ < /proc/uptime
        printf '[%s] %s\n' "$u" "${line%$'\r'}"
    done
}
dump_fds() {  # the L2 QEMU's fds with eventfd fdinfo, once, while the ping runs
    local d=$1 pid fd t
    pid=$(cat "$d/qemu.pid" 2>/dev/null) || return 0
    {
        echo "# t=$(up) pid=$pid"
        for fd in /proc/$pid/fd/*; do
            t=$(readlink "$fd") || continue
            echo "fd ${fd##*/} -> $t"
            case "$t" in
                *eventfd*) sed 's/^/    /' "/proc/$pid/fdinfo/${fd##*/}" ;;
            esac
        done
    } > "$d/l1-qemu-fds.txt" 2>&1
}
sampler() {  # L1 /proc/interrupts every 0.5 s while L2 runs
    local d=$1 n=0 dumped=0 u _
    while :; do
        read -r u _ < /proc/uptime
        echo "# sample $n t=$u"
        cat /proc/interrupts
        if [ $dumped = 0 ] && grep -q 'lab-l2: ping-begin' "$d/l2-console.log" 2>/dev/null; then
            dump_fds "$d"
            dumped=1
        fi
        n=$((n + 1))
        sleep 0.5
    done > "$d/l1-interrupts-during.txt"
}

IFS=, read -r -a runs <<< "$RUNS"
for run in "${runs[@]}"; do
    name=${run%%:*}
    extra=${run#*:}
    d=$OUT/$name
    mkdir -p "$d"
    dev_opt="vfio-pci,host=$BDF,addr=0x5${extra:+,$extra}"
    argv=(qemu-system-x86_64 -name l2 -accel kvm -cpu host -machine q35 -m 256 -smp 1
        -nodefaults -no-user-config -display none -no-reboot -serial stdio
        -pidfile "$d/qemu.pid"
        -kernel "$LAB/l2/vmlinuz" -initrd "$LAB/l2/initrd.cpio"
        -append "console=ttyS0 rdinit=/lab-init panic=-1 loglevel=4 lab.mac=$MAC lab.pings=$PINGS"
        -device "$dev_opt")
    printf '%q ' "${argv[@]}" > "$d/l2-qemu-argv.txt"
    echo >> "$d/l2-qemu-argv.txt"
    echo > $T/trace
    cat /proc/interrupts > "$d/l1-interrupts-before.txt"
    echo 1 > $T/tracing_on
    : > "$d/l2-console.log"
    sampler "$d" &
    sampler_pid=$!
    t_start=$(up)
    say "run $name: start L2 ($dev_opt)"
    "${argv[@]}" < /dev/null 2>&1 | stamp > "$d/l2-console.log"
    rc=${PIPESTATUS[0]}
    t_end=$(up)
    kill "$sampler_pid"
    wait "$sampler_pid" 2>/dev/null
    echo 0 > $T/tracing_on
    cat /proc/interrupts > "$d/l1-interrupts-after.txt"
    cat $T/trace > "$d/trace.txt"
    tail -n +1 $T/per_cpu/cpu*/stats > "$d/trace-stats.txt"
    dmesg > "$d/l1-dmesg.txt"
    uname -r > "$d/uname-r.txt"
    rm -f "$d/qemu.pid"
    printf 'qemu_start %s\nqemu_exit %s\nqemu_rc %s\n' "$t_start" "$t_end" "$rc" > "$d/l1-timing.txt"
    say "run $name: L2 exited rc=$rc after $(echo "$t_end - $t_start" | bc 2>/dev/null || echo "$t_start..$t_end") s"
done

# ---- 6. hand the results back -----------------------------------------------------------------
dmesg > "$OUT/l1-dmesg-final.txt"
rm -rf "$LAB/out"
cp -r "$OUT" "$LAB/out"
sync
umount "$LAB"
say "done"
finish
