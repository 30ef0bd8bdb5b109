#!/bin/sh
# /init of the nbdvault test VM (integration/vm, docs/vm.md). It mounts
# what the tools need, loads the virtio drivers, names the virtio-serial
# ports as udev would (there is no udev here), and then serves commands
# from the host on the control port, forever.
#
# Agent protocol, one line each way:
#   host:  ID SECONDS BASE64-OF-SCRIPT
#   guest: ID o BASE64-LINE      (the script's stdout+stderr, in pieces)
#          ID x EXIT-STATUS      (last)
# Base64 keeps any output, binary or without a final newline, on lines.

export PATH=/usr/sbin:/usr/bin HOME=/root TERM=dumb
# libdevmapper makes the device nodes itself instead of waiting for udev.
export DM_DISABLE_UDEV=1 LVM_SUPPRESS_FD_WARNINGS=1

say() { echo "nbdvault-vm: $*" >/dev/console; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts devpts /dev/pts
# debugfs tells whether the host end of a virtio-serial port is connected
# (vm.AttachNBD waits for that).
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/lvm /run/mdadm /run/agent
ln -s /proc/self/fd /dev/fd

# A helper the agent's commands use too (vm.AttachNBD): make
# /dev/virtio-ports/NAME for every port the host has named so far.
cat >/usr/sbin/vm-name-ports <<'EOF'
#!/bin/sh
for d in /sys/class/virtio-ports/*; do
	[ -r "$d/name" ] || continue
	n=$(cat "$d/name")
	[ -n "$n" ] && [ ! -e "/dev/virtio-ports/$n" ] && ln -s "/dev/${d##*/}" "/dev/virtio-ports/$n"
done
true
EOF
chmod 755 /usr/sbin/vm-name-ports

# crc32c_generic too: libcrc32c (raid456, dm-raid, ext4) asks the crypto
# API for "crc32c", which the kernel would find through modules.alias and
# a usermode modprobe; loading the implementation first is simpler.
modprobe -a virtio_pci virtio_blk virtio_console crc32c_generic || say "modprobe at boot failed"

ctl=/dev/virtio-ports/nbdvault.ctl
# Port names arrive from the host shortly after the driver binds.
i=0
while :; do
	vm-name-ports
	[ -e $ctl ] && break
	i=$((i + 1))
	if [ $i -gt 600 ]; then
		say "no control port after 60 s; ports: $(ls /sys/class/virtio-ports 2>&1)"
		poweroff -f
	fi
	usleep 100000
done

# nbdvault.shell on the kernel command line: a shell on the serial
# console too, for a person (docs/vm.md).
if grep -qw nbdvault.shell /proc/cmdline; then
	setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1' &
fi

said=
serve() {
	exec 3<>$ctl
	# Once: with no host on the port this runs every second.
	[ -n "$said" ] || say "agent ready on $ctl"
	said=1
	while read -r id secs b64 <&3; do
		echo "$b64" | base64 -d >/run/agent/cmd.sh
		# fd 3 is closed for the command: a daemon it starts (socat)
		# must not hold the control port.
		timeout -s KILL "$secs" sh /run/agent/cmd.sh </dev/null >/run/agent/out 2>&1 3>&-
		code=$?
		base64 /run/agent/out | sed "s/^/$id o /" >&3
		echo "$id x $code" >&3
	done
	exec 3>&-
}

while :; do
	serve
	# The host closed the control port; wait for it to come back.
	sleep 1
done
