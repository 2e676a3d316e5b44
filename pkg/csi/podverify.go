package csi

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// APIPods verifies pods against the Kubernetes API server.
type APIPods struct {
	Client kubernetes.Interface
	// NodeID, if set, must be the pod's spec.nodeName.
	NodeID string
}

// NewAPIPods connects to the API server with kubeconfig, or in-cluster
// when kubeconfig is empty. It returns nil and no error when kubeconfig is
// empty and the process does not run in a cluster: pods cannot be verified.
func NewAPIPods(kubeconfig, nodeID string) (*APIPods, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) {
			return nil, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("API server configuration: %w", err)
	}
	cfg.Timeout = 10 * time.Second
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("API server client: %w", err)
	}
	return &APIPods{Client: c, NodeID: nodeID}, nil
}

// VerifyPod checks that the pod exists with that UID (and on this node).
// An API server that cannot answer is Unavailable: kubelet retries.
func (a *APIPods) VerifyPod(ctx context.Context, namespace, name, uid string) error {
	pod, err := a.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return status.Errorf(codes.PermissionDenied, "pod %s/%s does not exist in the API server", namespace, name)
	case err != nil:
		return status.Errorf(codes.Unavailable, "verifying pod %s/%s with the API server: %v", namespace, name, err)
	case string(pod.UID) != uid:
		return status.Errorf(codes.PermissionDenied, "pod %s/%s has UID %s in the API server, not %s", namespace, name, pod.UID, uid)
	case a.NodeID != "" && pod.Spec.NodeName != a.NodeID:
		return status.Errorf(codes.PermissionDenied, "pod %s/%s runs on node %q, not this one (%s)", namespace, name, pod.Spec.NodeName, a.NodeID)
	}
	return nil
}
