package k8s

import (
	"context"
	"fmt"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// suiteLabel marks the namespaces this suite creates.
const suiteLabel = "rookzmq.io/e2e"

// earlierPVs are PVs of our driver that an earlier, interrupted run left and
// that did not go away at start: checkNoOrphans does not blame this run for
// them (they are logged).
var earlierPVs = map[string]bool{}

// leftoverNamespace tells whether a namespace is one an earlier run of this
// suite or of Kubernetes' upstream e2e tests (which label theirs e2e-run)
// created. The suite's own namespace, with the chart, stays.
func leftoverNamespace(name string, labels map[string]string) bool {
	if name == namespace {
		return false
	}
	if labels[suiteLabel] != "" || labels["e2e-run"] != "" {
		return true
	}
	// Runs from before the label: the suite's fixed names.
	switch name {
	case "team-a", "team-b", "e2e-fs", "e2e-block", "e2e-survive", "e2e-upgrade":
		return true
	}
	return false
}

// clearLeftovers deletes the namespaces an interrupted earlier run left on
// the cluster (a killed run keeps its pods and PVCs, and the PVs behind them
// would be counted as this run's orphans) and waits until they and the PVs
// of our driver are gone. PVs that stay are logged and left out of the final
// orphan check.
func clearLeftovers() error {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	nss, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	var stale []string
	for _, ns := range nss.Items {
		if leftoverNamespace(ns.Name, ns.Labels) {
			stale = append(stale, ns.Name)
			if err := client.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("deleting namespace %s an earlier run left: %w", ns.Name, err)
			}
		}
	}
	// The upstream tests' StorageClasses are named after their namespace.
	scs, err := client.StorageV1().StorageClasses().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, sc := range scs.Items {
		for _, ns := range stale {
			if strings.HasPrefix(sc.Name, ns+"-") {
				if err := client.StorageV1().StorageClasses().Delete(ctx, sc.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
					return fmt.Errorf("deleting StorageClass %s an earlier run left: %w", sc.Name, err)
				}
			}
		}
	}
	names, pvs, err := ourPVs(ctx)
	if err != nil {
		return err
	}
	if len(stale) == 0 && len(pvs) == 0 {
		return nil
	}
	logf("an earlier run left namespaces %v and PVs %v: deleting them", stale, pvs)
	err = poll(ctx, 3*time.Minute, func() (bool, error) {
		for _, name := range stale {
			if _, err := client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return false, nil
			}
		}
		names, pvs, err = ourPVs(ctx)
		return err == nil && len(pvs) == 0, err
	})
	if err != nil {
		logf("WARNING: left by an earlier run and still there after %s: PVs %v (%v); not counted as this run's orphans",
			time.Since(start).Round(time.Second), pvs, err)
		for _, name := range names {
			earlierPVs[name] = true
		}
		return nil
	}
	logf("earlier run's leftovers gone in %s", time.Since(start).Round(100*time.Millisecond))
	return nil
}

// ourPVs lists the PVs of our drivers, except those an earlier run left: their
// names, and the same with phase and claim for messages.
func ourPVs(ctx context.Context) (names, described []string, err error) {
	list, err := client.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, err
	}
	for _, pv := range list.Items {
		if pv.Spec.CSI == nil || !strings.HasSuffix(pv.Spec.CSI.Driver, ".rookzmq.io") || earlierPVs[pv.Name] {
			continue
		}
		claim := ""
		if ref := pv.Spec.ClaimRef; ref != nil {
			claim = ref.Namespace + "/" + ref.Name
		}
		names = append(names, pv.Name)
		described = append(described, fmt.Sprintf("%s(%s %s)", pv.Name, pv.Status.Phase, claim))
	}
	return names, described, nil
}
