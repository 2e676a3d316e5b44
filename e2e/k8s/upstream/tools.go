//go:build tools

package upstream

// agnhost, which the storage tests run in pods, is built from the same
// k8s.io/kubernetes as e2e.test (e2e/image/build.sh e2e-images).
import _ "k8s.io/kubernetes/test/images/agnhost"
