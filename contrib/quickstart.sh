#!/bin/sh
# The README's quick start: a two-disk domain of plain image files (vda qcow2, vdb raw) on the embedded
# `images` driver, then create, list --tree, revert and delete. Needs qemu-img/qemu-io and `snapfw` on PATH.
set -eu
DIR=${1:-$(mktemp -d /tmp/snapfw-quickstart.XXXXXX)}
export SNAPFW_CONNECT="images://$DIR"
cd "$DIR"
qemu-img create -q -f qcow2 demo-vda.qcow2 64M
qemu-img create -q -f raw demo-vdb.img 64M
cat > demo.yaml <<YAML
disks:
  - {target: vda, path: demo-vda.qcow2, format: qcow2}
  - {target: vdb, path: demo-vdb.img, format: raw}
YAML
show() { echo "\$ $*"; "$@"; }
qemu-io -f qcow2 -c 'write -P 0x11 0 64k' demo-vda.qcow2 >/dev/null
qemu-io -f raw -c 'write -P 0x21 0 64k' demo-vdb.img >/dev/null
show snapfw create demo before-upgrade --description "clean install"
qemu-io -f qcow2 -c 'write -P 0x12 0 64k' demo-vda.qcow2 >/dev/null
show snapfw create demo after-upgrade
show snapfw revert demo before-upgrade
show snapfw create demo experiment
show snapfw list demo --tree
show snapfw delete demo after-upgrade
show snapfw list demo
echo "vda reads the 'before-upgrade' data again (0x11, not 0x12):"
qemu-io -f qcow2 -c 'read -P 0x11 0 64k' demo-vda.qcow2 | head -1
echo "domain file $DIR/demo.yaml now:"
cat demo.yaml
