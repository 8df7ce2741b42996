// Command libcni-client is a small CNI runtime (a cnitool equivalent) built
// on Debian's libcni (golang-github-appc-cni-dev 1.1.2). The tests in
// netns-tests/tests/libcni.rs use it to drive the `flannel` CNI plugin the
// way a real runtime does.
//
//	libcni-client <add|check|del|gc|status|version> --conflist FILE --plugin-dir DIR
//	    [--netns PATH] [--container-id ID] [--ifname IF] [--args 'K=V;K2=V2']
//	    [--cap-args JSON] [--cache-dir DIR] [--valid-attachments JSON] [--timeout DUR]
//
// On success the result (ADD: the CNI result; VERSION: the plugin infos;
// otherwise {}) is printed as JSON on stdout and the exit code is 0. On
// failure {"code":N,"msg":...,"details":...,"error":...} is printed on
// stdout (code and msg of the plugin's CNI error if there was one, code 0
// for a failure of the client itself; error is the whole error chain) and
// the exit code is 1. Exit code 2 is a usage error. One line on stderr
// says which path served the command ("via libcni" or "via exec").
//
// How each command is served:
//
//   - add, check, del: through libcni (AddNetworkList, CheckNetworkList,
//     DelNetworkList, with its result cache in --cache-dir) when the
//     conflist's cniVersion is one libcni 1.1.2 knows (up to 1.0.0). That
//     libcni cannot parse a 1.1.0 result, so for a cniVersion it does not
//     know the client runs the chain itself with the same protocol: the same
//     config injection (name, cniVersion, prevResult, runtimeConfig filtered
//     by each plugin's capabilities, via libcni.InjectConf), the same CNI_*
//     environment (libcni's invoke.Args) and libcni's plugin executor, DEL
//     in reverse order, and its own result cache in --cache-dir/exec-results.
//   - gc, status: libcni 1.1.2 has neither (no GCNetworkList, no
//     GetStatusNetworkList), so the client executes every plugin of the list
//     itself, as CNI 1.1 specifies: CNI_COMMAND=GC or STATUS, CNI_PATH set,
//     the other CNI_* variables empty, stdin the plugin's config with name
//     and cniVersion injected and, for GC, "cni.dev/valid-attachments" (the
//     --valid-attachments list, default []). GC runs every plugin and
//     reports all failures; STATUS stops at the first failing plugin. Unlike
//     libcni >= 1.2's GCNetworkList, GC does not first send DEL for cached
//     attachments missing from the list: the point is to test the plugin's
//     own GC. Like libcni >= 1.2, a conflist older than 1.1.0 makes both a
//     no-op.
//
// Capability args (--cap-args) are filtered per plugin by its
// "capabilities", as libcni does. CHECK and DEL without --cap-args (or
// --args) use those of the cached ADD, so a DEL always sees what the ADD saw.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// options are the command line flags.
type options struct {
	conflist    string
	pluginDir   string
	netns       string
	containerID string
	ifname      string
	args        string
	capArgs     string
	cacheDir    string
	validAttach string
	timeout     time.Duration
	argsSet     bool
	capArgsSet  bool
}

// clientError is a failure of the client itself (no CNI error code).
type clientError struct{ msg string }

func (e *clientError) Error() string { return e.msg }

func failf(format string, a ...interface{}) error {
	return &clientError{msg: fmt.Sprintf(format, a...)}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: libcni-client <add|check|del|gc|status|version> --conflist FILE --plugin-dir DIR [--netns PATH] [--container-id ID] [--ifname IF] [--args 'K=V;...'] [--cap-args JSON] [--cache-dir DIR] [--valid-attachments JSON] [--timeout DUR]")
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	command := os.Args[1]
	var o options
	fs := flag.NewFlagSet(command, flag.ContinueOnError)
	fs.StringVar(&o.conflist, "conflist", "", "network configuration list file")
	fs.StringVar(&o.pluginDir, "plugin-dir", "", "directory with the plugin binaries (CNI_PATH)")
	fs.StringVar(&o.netns, "netns", "", "container network namespace path (CNI_NETNS)")
	fs.StringVar(&o.containerID, "container-id", "", "container ID (CNI_CONTAINERID)")
	fs.StringVar(&o.ifname, "ifname", "eth0", "interface name in the container (CNI_IFNAME)")
	fs.StringVar(&o.args, "args", "", "CNI_ARGS, K=V pairs separated by ';'")
	fs.StringVar(&o.capArgs, "cap-args", "", "capability args, a JSON object (e.g. {\"portMappings\":[...]})")
	fs.StringVar(&o.cacheDir, "cache-dir", "", "the runtime's result cache directory (required for add/check/del)")
	fs.StringVar(&o.validAttach, "valid-attachments", "[]", "GC: JSON list of {\"containerID\":..,\"ifname\":..}")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "overall timeout")
	if err := fs.Parse(os.Args[2:]); err != nil {
		usage()
		os.Exit(2)
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "args":
			o.argsSet = true
		case "cap-args":
			o.capArgsSet = true
		}
	})
	if fs.NArg() != 0 || o.conflist == "" || o.pluginDir == "" {
		usage()
		os.Exit(2)
	}

	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	out, err := run(ctx, command, &o)
	cancel()
	if err != nil {
		report(err)
		os.Exit(1)
	}
	if out == nil {
		out = json.RawMessage("{}")
	}
	text, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		report(err)
		os.Exit(1)
	}
	fmt.Println(string(text))
}

// report prints err as the client's error JSON on stdout.
func report(err error) {
	body := map[string]interface{}{"code": 0, "msg": err.Error(), "error": err.Error()}
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		body["code"] = cniErr.Code
		body["msg"] = cniErr.Msg
		if cniErr.Details != "" {
			body["details"] = cniErr.Details
		}
	}
	text, _ := json.Marshal(body)
	fmt.Println(string(text))
}

// run serves one command; the returned value is printed as JSON.
func run(ctx context.Context, command string, o *options) (interface{}, error) {
	list, err := libcni.ConfListFromFile(o.conflist)
	if err != nil {
		return nil, failf("cannot load %s: %v", o.conflist, err)
	}
	switch command {
	case "add", "check", "del":
		if o.cacheDir == "" {
			return nil, failf("--cache-dir is required for %s (libcni's default is /var/lib/cni)", command)
		}
		if o.containerID == "" {
			return nil, failf("--container-id is required for %s", command)
		}
		rt, err := runtimeConf(o)
		if err != nil {
			return nil, err
		}
		if knownToLibcni(list.CNIVersion) {
			fmt.Fprintf(os.Stderr, "libcni-client: %s cniVersion %s via libcni\n", command, list.CNIVersion)
			return viaLibcni(ctx, command, list, rt, o)
		}
		fmt.Fprintf(os.Stderr, "libcni-client: %s cniVersion %s via exec (libcni 1.1.2 knows CNI up to %s)\n", command, list.CNIVersion, version.Current())
		return viaExec(ctx, command, list, rt, o)
	case "gc", "status":
		if newer, err := version.GreaterThanOrEqualTo(list.CNIVersion, "1.1.0"); err != nil {
			return nil, failf("bad cniVersion %q: %v", list.CNIVersion, err)
		} else if !newer {
			fmt.Fprintf(os.Stderr, "libcni-client: %s is a no-op for cniVersion %s (< 1.1.0)\n", command, list.CNIVersion)
			return nil, nil
		}
		fmt.Fprintf(os.Stderr, "libcni-client: %s cniVersion %s via exec (libcni 1.1.2 has no %s)\n", command, list.CNIVersion, strings.ToUpper(command))
		if command == "gc" {
			return nil, gc(ctx, list, o)
		}
		return nil, status(ctx, list, o)
	case "version":
		cni := libcni.NewCNIConfig([]string{o.pluginDir}, nil)
		infos := map[string]interface{}{}
		for _, p := range list.Plugins {
			info, err := cni.GetVersionInfo(ctx, p.Network.Type)
			if err != nil {
				return nil, fmt.Errorf("VERSION of %s: %w", p.Network.Type, err)
			}
			infos[p.Network.Type] = map[string]interface{}{"supportedVersions": info.SupportedVersions()}
		}
		return infos, nil
	default:
		return nil, failf("unknown command %q", command)
	}
}

// knownToLibcni is whether libcni (1.1.2: up to 1.0.0) can handle results of cniVersion v.
func knownToLibcni(v string) bool {
	for _, known := range version.All.SupportedVersions() {
		if known == v {
			return true
		}
	}
	return false
}

// runtimeConf builds the libcni runtime config from the flags.
func runtimeConf(o *options) (*libcni.RuntimeConf, error) {
	rt := &libcni.RuntimeConf{
		ContainerID: o.containerID,
		NetNS:       o.netns,
		IfName:      o.ifname,
	}
	if o.args != "" {
		for _, pair := range strings.Split(o.args, ";") {
			kv := strings.SplitN(pair, "=", 2)
			if len(kv) != 2 {
				return nil, failf("bad --args entry %q (want K=V)", pair)
			}
			rt.Args = append(rt.Args, [2]string{kv[0], kv[1]})
		}
	}
	if o.capArgs != "" {
		if err := json.Unmarshal([]byte(o.capArgs), &rt.CapabilityArgs); err != nil {
			return nil, failf("bad --cap-args: %v", err)
		}
	}
	return rt, nil
}

// viaLibcni serves add/check/del through libcni's network list API.
func viaLibcni(ctx context.Context, command string, list *libcni.NetworkConfigList, rt *libcni.RuntimeConf, o *options) (interface{}, error) {
	cni := libcni.NewCNIConfigWithCacheDir([]string{o.pluginDir}, o.cacheDir, nil)
	if command != "add" {
		// Use the ADD's CNI_ARGS and capability args unless given.
		_, cached, err := cni.GetNetworkListCachedConfig(list, rt)
		if err != nil {
			return nil, err
		}
		if cached != nil {
			if !o.argsSet {
				rt.Args = cached.Args
			}
			if !o.capArgsSet {
				rt.CapabilityArgs = cached.CapabilityArgs
			}
		}
	}
	switch command {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return nil, err
		}
		// Print the result as the plugin chain returned it (its own version).
		text, err := json.Marshal(result)
		if err != nil {
			return nil, err
		}
		return json.RawMessage(text), nil
	case "check":
		return nil, cni.CheckNetworkList(ctx, list, rt)
	default:
		return nil, cni.DelNetworkList(ctx, list, rt)
	}
}

// execCache is what viaExec remembers of an ADD (like libcni's cache).
type execCache struct {
	ContainerID    string                 `json:"containerId"`
	IfName         string                 `json:"ifName"`
	NetworkName    string                 `json:"networkName"`
	CniArgs        [][2]string            `json:"cniArgs,omitempty"`
	CapabilityArgs map[string]interface{} `json:"capabilityArgs,omitempty"`
	Result         map[string]interface{} `json:"result"`
}

func execCachePath(o *options, list *libcni.NetworkConfigList, rt *libcni.RuntimeConf) string {
	return filepath.Join(o.cacheDir, "exec-results", fmt.Sprintf("%s-%s-%s", list.Name, rt.ContainerID, rt.IfName))
}

// pluginConf is net with name, cniVersion, prevResult and the runtimeConfig
// of its capabilities injected, as libcni builds it.
func pluginConf(list *libcni.NetworkConfigList, net *libcni.NetworkConfig, prev map[string]interface{}, rt *libcni.RuntimeConf) (*libcni.NetworkConfig, error) {
	inject := map[string]interface{}{"name": list.Name, "cniVersion": list.CNIVersion}
	if prev != nil {
		inject["prevResult"] = prev
	}
	rc := map[string]interface{}{}
	for capability, on := range net.Network.Capabilities {
		if data, ok := rt.CapabilityArgs[capability]; ok && on {
			rc[capability] = data
		}
	}
	if len(rc) > 0 {
		inject["runtimeConfig"] = rc
	}
	return libcni.InjectConf(net, inject)
}

// execPlugin runs one plugin with the CNI environment of command and rt.
func execPlugin(ctx context.Context, command string, o *options, net *libcni.NetworkConfig, rt *libcni.RuntimeConf) ([]byte, error) {
	exe := &invoke.RawExec{Stderr: os.Stderr}
	path, err := exe.FindInPath(net.Network.Type, []string{o.pluginDir})
	if err != nil {
		return nil, err
	}
	args := &invoke.Args{
		Command:     command,
		ContainerID: rt.ContainerID,
		NetNS:       rt.NetNS,
		PluginArgs:  rt.Args,
		IfName:      rt.IfName,
		Path:        o.pluginDir,
	}
	return exe.ExecPlugin(ctx, path, net.Bytes, args.AsEnv())
}

// viaExec serves add/check/del for a cniVersion libcni does not know.
func viaExec(ctx context.Context, command string, list *libcni.NetworkConfigList, rt *libcni.RuntimeConf, o *options) (interface{}, error) {
	cachePath := execCachePath(o, list, rt)
	var cached *execCache
	if data, err := ioutil.ReadFile(cachePath); err == nil {
		cached = &execCache{}
		if err := json.Unmarshal(data, cached); err != nil {
			return nil, failf("bad cache file %s: %v", cachePath, err)
		}
		if command != "add" {
			if !o.argsSet {
				rt.Args = cached.CniArgs
			}
			if !o.capArgsSet {
				rt.CapabilityArgs = cached.CapabilityArgs
			}
		}
	}
	var prev map[string]interface{}
	if cached != nil && command != "add" {
		prev = cached.Result
	}
	switch command {
	case "add":
		for _, net := range list.Plugins {
			conf, err := pluginConf(list, net, prev, rt)
			if err != nil {
				return nil, err
			}
			out, err := execPlugin(ctx, "ADD", o, conf, rt)
			if err != nil {
				return nil, fmt.Errorf("plugin type=%q failed (add): %w", net.Network.Type, err)
			}
			prev = map[string]interface{}{}
			if err := json.Unmarshal(out, &prev); err != nil {
				return nil, failf("plugin type=%q returned a result that is not JSON: %v: %q", net.Network.Type, err, out)
			}
		}
		entry := execCache{
			ContainerID:    rt.ContainerID,
			IfName:         rt.IfName,
			NetworkName:    list.Name,
			CniArgs:        rt.Args,
			CapabilityArgs: rt.CapabilityArgs,
			Result:         prev,
		}
		data, err := json.Marshal(&entry)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Dir(cachePath), 0o700); err != nil {
			return nil, err
		}
		if err := ioutil.WriteFile(cachePath, data, 0o600); err != nil {
			return nil, err
		}
		return prev, nil
	case "check":
		if list.DisableCheck {
			return nil, nil
		}
		for _, net := range list.Plugins {
			conf, err := pluginConf(list, net, prev, rt)
			if err != nil {
				return nil, err
			}
			if _, err := execPlugin(ctx, "CHECK", o, conf, rt); err != nil {
				return nil, err
			}
		}
		return nil, nil
	default:
		for i := len(list.Plugins) - 1; i >= 0; i-- {
			net := list.Plugins[i]
			conf, err := pluginConf(list, net, prev, rt)
			if err != nil {
				return nil, err
			}
			if _, err := execPlugin(ctx, "DEL", o, conf, rt); err != nil {
				return nil, fmt.Errorf("plugin type=%q failed (delete): %w", net.Network.Type, err)
			}
		}
		_ = os.Remove(cachePath)
		return nil, nil
	}
}

// gc sends GC with the valid attachments to every plugin of the list.
func gc(ctx context.Context, list *libcni.NetworkConfigList, o *options) error {
	var valid []map[string]string
	if err := json.Unmarshal([]byte(o.validAttach), &valid); err != nil {
		return failf("bad --valid-attachments: %v", err)
	}
	if valid == nil {
		valid = []map[string]string{}
	}
	var errs []error
	for _, net := range list.Plugins {
		conf, err := libcni.InjectConf(net, map[string]interface{}{
			"name":                      list.Name,
			"cniVersion":                list.CNIVersion,
			"cni.dev/valid-attachments": valid,
		})
		if err == nil {
			_, err = execPlugin(ctx, "GC", o, conf, &libcni.RuntimeConf{})
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("failed to GC plugin %s: %w", net.Network.Type, err))
		}
	}
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	default:
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = e.Error()
		}
		return fmt.Errorf("%s (first: %w)", strings.Join(msgs, "; "), errs[0])
	}
}

// status sends STATUS to every plugin of the list, stopping at a failure.
func status(ctx context.Context, list *libcni.NetworkConfigList, o *options) error {
	for _, net := range list.Plugins {
		conf, err := libcni.InjectConf(net, map[string]interface{}{
			"name":       list.Name,
			"cniVersion": list.CNIVersion,
		})
		if err != nil {
			return err
		}
		if _, err := execPlugin(ctx, "STATUS", o, conf, &libcni.RuntimeConf{}); err != nil {
			return err
		}
	}
	return nil
}
